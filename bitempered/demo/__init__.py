"""Noisy-label demo (issue 6): why the bi-tempered loss exists.

``python -m bitempered.demo`` trains a small MLP on scikit-learn's bundled 8x8 handwritten digits
(nothing is downloaded) with synthetic noise on the TRAINING labels (symmetric at 0/20/40/60%, and
40% class flips such as 7 -> 1, 3 -> 8), once with cross-entropy and once with each bi-tempered
loss ((0.8, 1.2), (0.5, 2.0), (0.2, 4.0) by default), over several seeds, and reports the
final-epoch accuracy on the CLEAN test labels (table, Markdown, CSV, plot). It also draws the
decision boundaries of every loss on a noisy 2-D data set. ``--framework torch`` (default) or
``jax``; ``--quick`` is a tiny configuration for CI; ``--help`` lists the rest.

``--learn-temperatures`` (issue 22) also trains every model with its own learnable (t1, t2),
starting at (1, 1), by gradient descent on the training loss (the library's exact temperature
gradients, per-row temperatures), and reports where the temperatures end, their trajectory and the
clean test accuracy next to the fixed losses (``learned_temperatures.md`` / ``.csv``).

Every loss, cross-entropy included, is computed by this library: cross-entropy is the bi-tempered
loss at t1 = t2 = 1 (KL divergence to the one-hot label, which has cross-entropy's gradient). All
losses share one training recipe (optimizer, learning rate, epochs, batches, initial weights);
nothing is tuned per loss or picked on the test set.

Modules, one idea each: ``data`` (digits, split, label noise), ``mlp`` (model, recipe, loss specs,
shared random draws), ``train_torch`` / ``train_jax`` (training per framework), ``experiment`` (the
loop), ``report`` (table, Markdown, CSV), ``learned_temperatures`` (the learnable-temperature run
and its report), ``plots`` (accuracy vs noise), ``boundaries`` (2-D picture), ``__main__``
(command line).
"""
