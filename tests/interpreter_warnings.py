"""The NumPy RuntimeWarnings that Triton's interpreter (TRITON_INTERPRET=1, CPU) raises while running
the kernels correctly, silenced in the tests that run them: ``pytestmark = EXPECTED``.

Each filter names the exact message and the interpreter module, so a warning with another message,
or one raised from our own code, stays visible. Why they are expected: a kernel block computes
on whole tiles, and lanes past the last row (N) or class (C) hold placeholders (-inf logits, zero
sums) that the store masks discard; a GPU computes the same inf/NaN silently, NumPy warns.
The kernel expressions (kernels/, measured on the tests of this suite):

- tempered_math.py ``a - mx`` in the max shift: -inf - (-inf) in masked lanes/rows ("subtract");
- tempered_math.py ``tl.log2(f)`` and ``f / g`` in the Newton step: f = g = 0 in rows past N
  ("log2", "divide");
- tempered_math.py ``tl.log2(y)`` in the binary solver: y = 0 in lanes past the end ("log2");
- softmax.py ``sum(w) / sum(p_t)`` in the softmax backward: 0 / 0 in rows past N ("divide");
- tempered_math.py ``a0 * (one_minus_t / c)`` in the original (num_iters=k) solver: c = 0 in rows
  past N ("divide by zero ... divide");
- tempered_math.py ``y * (log_t_y - log_t_p)`` in the loss: 0 * inf in masked lanes ("multiply");
- binary.py ``grad.to(<16-bit dtype>)`` on store: inf/NaN placeholders of masked lanes ("cast");
- tempered_math.py ``grad_terms`` at t2 < t1: p^(t2 - t1) of an underflowed p overflows; the
  select keeps only labels y > 0 there ("overflow ... exp2").
"""

import pytest

_INTERPRETER = "triton.runtime.interpreter"
MESSAGES = (
    "divide by zero encountered in log2",
    "invalid value encountered in subtract",
    "invalid value encountered in divide",
    "divide by zero encountered in divide",
    "invalid value encountered in multiply",
    "overflow encountered in cast",
    "overflow encountered in exp2",
)
EXPECTED = [pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning:{_INTERPRETER}") for message in MESSAGES]
