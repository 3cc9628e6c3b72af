"""The TensorFlow binding: what ``bitempered.keras`` runs on Keras' tensorflow backend.

- ``api``: the functions (per-row losses, tempered softmax/sigmoid) under ``tf.custom_gradient``;
  ``args``: argument checks and conversions (the shared messages of ``bindings/common/validation.py``);
- ``native/``: SPEC in TF ops (``math``: the solver, a port of ``bindings/jax/native/math.py``;
  ``loss``: the per-row loss and its closed-form gradient).

Importing this package imports nothing else: its modules import tensorflow.
"""
