"""The runner as a torch custom op: eager equals the runner, torch.compile(fullgraph=True) equals eager,
the fake implementation gives the shapes; chunked equals one pass (70 000 tokens x top-8 included)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEFAULT_TARGET, SPECS
from moegen.build import build
from moegen.reference import moe_ref, random_weights
from moegen.runtime import MoERunner
from moegen.spec import load_spec, parse_spec


class TinyModel(torch.nn.Module):
    """A block the way a model uses the layer: a linear in, the MoE op, a residual."""

    def __init__(self, moe, hidden: int):
        super().__init__()
        self.moe = moe
        self.proj = torch.nn.Linear(hidden, hidden, dtype=torch.bfloat16)

    def forward(self, x, logits):
        out = self.moe(self.proj(x), logits)
        if isinstance(out, tuple):
            shared, routed = out
            return x + shared + routed
        return x + out


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3-small"])
@torch.no_grad()  # inference: the op has no backward
def test_compiled_model_equals_eager(name, artifact):
    torch._dynamo.reset()
    spec = load_spec(SPECS / f"{name}.yaml")
    runner = MoERunner.load(artifact(name), random_weights(spec, 1))
    model = TinyModel(runner.as_op(f"test.{name}"), spec.hidden_size)
    x = torch.randn(19, spec.hidden_size).to(torch.bfloat16)
    logits = torch.randn(19, spec.num_experts)
    eager = model(x, logits)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, logits)
    assert torch.equal(eager, compiled)
    direct = runner(model.proj(x), logits)
    assert torch.equal(eager, x + direct[0] + direct[1] if isinstance(direct, tuple) else x + direct)


def test_fake_impl_shapes(artifact):
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = load_spec(SPECS / "latent-small.yaml")
    runner = MoERunner.load(artifact("latent-small"), random_weights(spec, 1))
    runner.as_op("test.latent")
    with FakeTensorMode():
        x = torch.empty(7, spec.hidden_size, dtype=torch.bfloat16)
        shared, routed = torch.ops.moegen.moe_forward_shared(x, torch.empty(7, spec.num_experts), "test.latent")
    assert tuple(shared.shape) == (7, spec.hidden_size) and tuple(routed.shape) == (7, spec.latent_size)


def test_unknown_layer_names_the_registered_ones():
    with pytest.raises(KeyError, match="no runner registered as 'nope'"):
        torch.ops.moegen.moe_forward(torch.zeros(1, 4), None, "nope")


@pytest.fixture(scope="module")
def chunky(tmp_path_factory):
    """A top-8 layer with small chunks: 70 000 tokens x 8 slots = 560 000 rows (SGLang overflowed at
    56k x 8) run as 11 chunks through one set of staging buffers."""
    spec = parse_spec(dict(name="chunky", dtype="float32", hidden_size=16, intermediate_size=8, num_experts=16,
                           top_k=8, max_chunk_tokens=6400))
    return spec, build(spec, DEFAULT_TARGET, tmp_path_factory.mktemp("chunky"), golden=False)


def test_70000_tokens_top8_chunked_equals_reference(chunky):
    spec, root = chunky
    w = random_weights(spec, 4)
    runner = MoERunner.load(root, w)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70_000, spec.hidden_size, generator=g)
    logits = torch.randn(70_000, spec.num_experts, generator=g)
    out = runner(x, logits)
    ref = moe_ref(spec, w, x, logits)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # one set of staging buffers, sized for a chunk, served all 11 chunks
    assert all(cap <= spec.max_chunk_tokens for cap, _ in runner._stage.values())


def test_chunked_equals_one_pass_exactly(chunky, artifact):
    """Chunking changes nothing but where the rows go: identical bits to a runner without chunks."""
    spec, root = chunky
    w = random_weights(spec, 4)
    chunked = MoERunner.load(root, w)
    whole = MoERunner.load(root, w)
    whole.spec = parse_spec(dict(spec.to_dict() | {"max_chunk_tokens": 1 << 20,
                                                   "quant": {"scheme": "none"}}))
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(20_000, spec.hidden_size, generator=g), torch.randn(20_000, spec.num_experts, generator=g)
    assert torch.equal(chunked(x, logits), whole(x, logits))


def test_shared_order_overlap_falls_back_on_cpu_and_bad_order_is_refused(artifact):
    """On the CPU there is no side stream: overlap runs the shared experts first, same result."""
    from moegen.runtime import RunnerInputError

    spec = load_spec(SPECS / "deepseek-v3-small.yaml")
    w = random_weights(spec, 1)
    before = MoERunner.load(artifact("deepseek-v3-small"), w)
    overlap = MoERunner.load(artifact("deepseek-v3-small"), w, shared_order="overlap")
    x, logits = torch.randn(9, spec.hidden_size).to(torch.bfloat16), torch.randn(9, spec.num_experts)
    assert all(torch.equal(a, b) for a, b in zip(before(x, logits), overlap(x, logits)))
    with pytest.raises(RunnerInputError, match="shared_order"):
        MoERunner.load(artifact("deepseek-v3-small"), w, shared_order="sideways")


@torch.no_grad()
def test_compiled_with_inductor_equals_eager(artifact):
    """The default backend too: inductor keeps the op opaque and compiles the rest."""
    torch._dynamo.reset()
    spec = load_spec(SPECS / "tiny.yaml")
    runner = MoERunner.load(artifact("tiny"), random_weights(spec, 1))
    model = TinyModel(runner.as_op("test.inductor"), spec.hidden_size)
    x, logits = torch.randn(11, spec.hidden_size).to(torch.bfloat16), torch.randn(11, spec.num_experts)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, logits), model(x, logits))
