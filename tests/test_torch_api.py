"""PyTorch API behaviour: bad input, backend choice, torch.compile, import hygiene."""

import subprocess
import sys

import pytest
import torch

from bitempered import torch as bt
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS  # Triton's interpreter on masked tails (see that module)

A = torch.randn(4, 5)
IDX = torch.tensor([0, 1, 2, 3])


def loss(**overrides):
    args = dict(logits=A, labels=IDX, t1=0.8, t2=1.2)
    args.update(overrides)
    return bt.bi_tempered_logistic_loss(**args)


@pytest.mark.parametrize("overrides,error,name", [
    (dict(t1=-0.1), ValueError, "t1"),
    (dict(t1=2.0), ValueError, "t1"),
    (dict(t1=torch.tensor(2.5)), ValueError, "t1"),
    (dict(t2=0.0), ValueError, "t2"),
    (dict(t2=float("nan")), ValueError, "t2"),
    (dict(t2="1.2"), TypeError, "t2"),
    (dict(t2=torch.tensor([1.1, 1.2])), TypeError, "t2"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(num_iters=0), ValueError, "num_iters"),
    (dict(num_iters=2.5), TypeError, "num_iters"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels shape"),
    (dict(labels=torch.rand(4, 6)), ValueError, "labels shape"),
    (dict(labels=torch.tensor([0, 1, 2, 5])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 1, -1, 3])), ValueError, "labels"),
    (dict(labels=torch.ones(4, dtype=torch.bool)), TypeError, "labels"),
    (dict(logits=torch.ones(4, 5, dtype=torch.long)), TypeError, "logits"),
    (dict(logits=torch.tensor(1.0), labels=torch.tensor(1.0)), ValueError, "logits"),
    (dict(logits=torch.randn(4, 0), labels=torch.rand(4, 0)), ValueError, "logits"),
    (dict(logits=torch.randn(4, 1), labels=torch.zeros(4, dtype=torch.long), label_smoothing=0.1),
     ValueError, "label_smoothing"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(label_smoothing=torch.tensor(1.0)), ValueError, "label_smoothing"),
    (dict(label_smoothing=torch.tensor([0.1, 0.2])), TypeError, "label_smoothing"),
    (dict(logits=torch.randn(4, 1), labels=torch.zeros(4, dtype=torch.long), label_smoothing=torch.tensor(0.1)),
     ValueError, "label_smoothing"),
    # SPEC's dense labels lie in [0, 1]: negative, > 1 and NaN values are rejected (they gave a NaN loss)
    (dict(labels=torch.tensor([[0.5, -0.5, 1.0, 0.0, 0.0]] * 4)), ValueError, "labels"),
    (dict(labels=torch.full((4, 5), 1.5)), ValueError, "labels"),
    (dict(labels=torch.tensor([[0.5, float("nan"), 0.5, 0.0, 0.0]] * 4)), ValueError, "labels"),
    # non-finite temperatures and smoothing (t2 = inf gave an all-NaN loss), out-of-range ints
    (dict(t2=float("inf")), ValueError, "t2 must be > 0 and finite"),
    (dict(t2=torch.tensor(float("inf"))), ValueError, "t2 must be > 0 and finite"),
    (dict(t1=float("inf")), ValueError, "t1"),
    (dict(t1=float("nan")), ValueError, "t1"),
    (dict(label_smoothing=float("inf")), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(num_iters=2**63), ValueError, "num_iters"),
    (dict(ignore_index=2**70), ValueError, "ignore_index"),
    (dict(ignore_index=-2**63 - 1), ValueError, "ignore_index"),
    (dict(inplace_backward="yes"), TypeError, "inplace_backward"),
    # torch has no comparison ops for these: a TypeError that names the supported dtypes
    (dict(labels=IDX.to(torch.uint16)), TypeError, "labels .* int64"),
    (dict(labels=IDX.to(torch.uint32)), TypeError, "labels .* int64"),
    (dict(labels=IDX.to(torch.uint64)), TypeError, "labels .* int64"),
])
def test_bad_input_names_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        loss(**overrides)


def test_bad_input_of_the_other_functions():
    with pytest.raises(ValueError, match="t"):
        bt.tempered_softmax(A, 0.0)
    with pytest.raises(ValueError, match="num_iters"):
        bt.tempered_sigmoid(A, 1.5, num_iters=-1)
    with pytest.raises(ValueError, match="labels shape"):
        bt.bi_tempered_binary_logistic_loss(A, torch.rand(4), 0.5, 1.5)
    with pytest.raises(ValueError, match="t1"):
        bt.BiTemperedLogisticLoss(t1=3.0, t2=1.0)
    with pytest.raises(ValueError, match="reduction"):
        bt.BiTemperedLogisticLoss(t1=0.5, t2=1.0, reduction="max")
    for t in (float("inf"), torch.tensor(float("inf"))):
        for function in (bt.tempered_softmax, bt.tempered_sigmoid):
            with pytest.raises(ValueError, match="t must be > 0 and finite"):
                function(A, t)
    with pytest.raises(ValueError, match="num_iters"):
        bt.tempered_softmax(A, 1.5, num_iters=2**63)
    with pytest.raises(ValueError, match="t2"):
        bt.bi_tempered_binary_logistic_loss(A, A.sigmoid(), 0.5, float("inf"))


def test_binary_labels_on_another_device_are_rejected():
    # (the meta tensor's uninitialized memory was read as labels)
    with pytest.raises(ValueError, match="labels are on meta but logits on cpu"):
        bt.bi_tempered_binary_logistic_loss(A, torch.rand(4, 5, device="meta"), 0.5, 1.5)


@pytest.mark.parametrize("settings,error,name", [
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ignore_index=2**70), ValueError, "ignore_index"),
    (dict(inplace_backward="yes"), TypeError, "inplace_backward"),
    (dict(t2=float("inf")), ValueError, "t2"),
    (dict(num_iters=2**63), ValueError, "num_iters"),
])
def test_the_module_checks_its_settings_when_built(settings, error, name):
    """The functional API's checks and messages, at construction (not at the first call)."""
    with pytest.raises(error, match=name) as built:
        bt.BiTemperedLogisticLoss(**dict(dict(t1=0.8, t2=1.2), **settings))
    with pytest.raises(error) as called:
        loss(**settings)
    assert str(built.value) == str(called.value)


def test_import_without_torch_names_the_extra():
    code = "import sys; sys.modules['torch'] = None; import bitempered.torch"  # torch hidden: import fails
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "ImportError" in out.stderr, out.stderr
    assert "install the 'torch' extra" in out.stderr and 'pip install -e ".[torch]"' in out.stderr, out.stderr


@pytest.mark.parametrize("labels", [torch.tensor([0.5, -0.1, 1.0]), torch.tensor([0.5, 1.1, 1.0]),
                                    torch.tensor([0.5, float("nan"), 1.0])])
def test_binary_labels_outside_zero_one_are_rejected(labels):
    with pytest.raises(ValueError, match="labels"):
        bt.bi_tempered_binary_logistic_loss(torch.randn(3), labels, 0.5, 1.5)


def test_dense_labels_at_the_edges_of_zero_one_are_accepted():
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0] * 5])
    assert torch.isfinite(loss(labels=y))
    assert torch.isfinite(bt.bi_tempered_binary_logistic_loss(torch.randn(3), torch.tensor([0.0, 0.5, 1.0]), 0.5, 1.5))


@pytest.mark.parametrize("indices", [True, False])
def test_label_smoothing_as_a_tensor_equals_the_float(indices):
    labels = IDX if indices else torch.softmax(torch.randn(4, 5), dim=-1)
    x = A.clone().requires_grad_()
    expected = loss(logits=x, labels=labels, label_smoothing=0.15, reduction="none")
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    out = loss(logits=x, labels=labels, label_smoothing=torch.tensor(0.15), reduction="none")
    out.sum().backward()
    assert torch.allclose(out, expected) and torch.allclose(x.grad, expected_grad)
    binary = [bt.bi_tempered_binary_logistic_loss(A[0], A[1].sigmoid(), 0.5, 1.5, label_smoothing=s)
              for s in (0.2, torch.tensor(0.2))]
    assert torch.allclose(binary[0], binary[1])


def test_label_smoothing_schedule_compiles_once():
    from torch._dynamo.testing import CompileCounter

    model = torch.nn.Linear(5, 5)

    def step(x, y, smoothing):
        return bt.bi_tempered_logistic_loss(model(x), y, 0.8, 1.2, label_smoothing=smoothing)

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for smoothing in (0.0, 0.05, 0.1, 0.2):
        out = compiled(A, IDX, torch.tensor(smoothing))
        out.backward()
        assert torch.allclose(out, step(A, IDX, smoothing))
    assert counter.frame_count == 1


def test_values_are_not_checked_while_compiling():
    """Traced labels are documented as unchecked: a bad value gives a NaN loss, not an error."""
    bad = torch.tensor([[0.5, -0.5, 1.0, 0.0, 0.0]] * 4)
    compiled = torch.compile(lambda x, y: bt.bi_tempered_logistic_loss(x, y, 0.8, 1.2, reduction="none"),
                             backend="eager", fullgraph=True)
    assert torch.isnan(compiled(A, bad)).all()


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    # Triton reads TRITON_INTERPRET when it is first imported: import it before unsetting the flag,
    # or every later interpreted kernel in this process fails.
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        loss(backend="triton")
    with pytest.raises(ValueError, match="float64"):
        loss(logits=A.double(), backend="triton")


def test_auto_uses_native_ops_on_cpu(monkeypatch):
    from bitempered.bindings.torch import ops as torch_ops

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran for a CPU tensor with backend='auto'")

    monkeypatch.setattr(torch_ops, "triton_launchers", fail)
    assert torch.isfinite(loss())


def test_torch_compile_fullgraph_without_recompiling_per_temperature():
    from torch._dynamo.testing import CompileCounter

    model = torch.nn.Linear(5, 5)

    def step(x, y, t1, t2):
        return bt.bi_tempered_logistic_loss(model(x), y, t1, t2, label_smoothing=0.1)

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for t1, t2 in [(0.8, 1.2), (0.7, 1.3), (0.5, 0.8), (1.0, 1.0)]:
        out = compiled(A, IDX, torch.tensor(t1), torch.tensor(t2))
        out.backward()
        expected = step(A, IDX, t1, t2)
        assert torch.allclose(out, expected)
    assert counter.frame_count == 1


def test_torch_compile_inductor_matches_eager():
    model = torch.nn.Linear(5, 5)
    x = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))

    def step(t2):
        return bt.bi_tempered_logistic_loss(model(x), y, 0.8, t2)

    def value_and_grad(fn):
        model.zero_grad()
        out = fn(torch.tensor(1.2))
        out.backward()
        return out.detach(), model.weight.grad.clone()

    eager = value_and_grad(step)
    compiled = value_and_grad(torch.compile(step, fullgraph=True))
    assert torch.allclose(eager[0], compiled[0]) and torch.allclose(eager[1], compiled[1], atol=1e-6)


def test_importing_the_torch_api_imports_neither_jax_nor_triton():
    # (Calling a custom op may let torch itself import triton where it is installed; importing must not.)
    code = ("import sys, bitempered.torch as bt, torch; imported = [m for m in ('jax', 'triton') if m in sys.modules]; "
            "bt.bi_tempered_logistic_loss(torch.randn(2, 3), torch.tensor([0, 1]), 0.8, 1.2); "
            "print(imported, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False"


def test_importing_bitempered_imports_no_framework():
    code = "import sys, bitempered; print(sorted(m for m in ('jax', 'torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_into_the_logits(reduction, backend, dtype):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = torch.randn(6, 9, dtype=dtype, device=device)
    y = torch.tensor([0, 1, 2, -100, 4, 5], device=device)
    reference = x.clone().requires_grad_()
    expected_loss = bt.bi_tempered_logistic_loss(reference, y, 0.6, 1.4, reduction=reduction, backend=backend)
    upstream = torch.rand(expected_loss.shape, dtype=dtype, device=device) + 0.5
    expected_loss.backward(upstream)
    layer_out = (x.clone().requires_grad_() * 1.0)  # a non-leaf, like a Linear layer's output
    storage = layer_out.data_ptr()
    loss = bt.bi_tempered_logistic_loss(layer_out, y, 0.6, 1.4, reduction=reduction, inplace_backward=True,
                                        backend=backend)
    assert torch.allclose(loss, expected_loss)
    (grad,) = torch.autograd.grad(loss, layer_out, upstream)
    assert torch.allclose(grad, reference.grad, atol=1e-7)
    assert grad.data_ptr() == storage  # no N x C buffer beyond the logits' own


def test_second_backward_through_the_same_loss():
    """A retained graph keeps its stored gradient (the backward scales it out of place there), so a
    second backward adds the same gradient again; one that was not retained is refused by autograd."""
    x = torch.randn(4, 5, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(x, IDX, 0.8, 1.2)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
