"""SPEC in TensorFlow ops (XLA under ``tf.function(jit_compile=True)``)."""
