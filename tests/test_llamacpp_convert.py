"""llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python sdist on PyPI) on every layout
and shared-expert count: what it writes (read back with gguf-py), or that it refuses where the layout's
runtime facts say llama.cpp cannot load the model. Inference is compared in benchmarks/runtimes.py."""
import pytest

import moeforge
from moeforge.layouts import layout_named
from moeforge.layouts.base import MoEShape
from moeforge.layouts.runtimes import FAILS, LLAMA_CPP

kit = pytest.importorskip("llamacpp_kit")
pytest.importorskip("sentencepiece", reason="convert_hf_to_gguf.py imports sentencepiece (the `test` extra)")

H, I = kit.HIDDEN, kit.INTERMEDIATE
ARCH = {"mixtral": "llama", "qwen": "qwen2moe", "qwen3": "qwen3moe", "deepseek": "deepseek"}
CASES = [  # layout, routed experts, shared experts, base family
    ("mixtral", 4, 0, "llama"),
    ("mixtral", 3, 0, "llama"),  # not a power of two
    ("qwen", 4, 1, "llama"),
    ("qwen", 4, 2, "llama"),
    ("qwen3", 4, 0, "qwen3"),
    ("deepseek", 4, 0, "llama"),
    ("deepseek", 4, 1, "llama"),
    ("deepseek", 4, 2, "llama"),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    try:
        kit.source()
    except kit.Unavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("llamacpp")
    return {family: kit.make_dense(root / family, family, seed=1) for family in ("llama", "qwen3")}


def _build(base, out, layout, n_routed, n_shared):
    cfg = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "architecture": layout,
           "experts": [{"source_model": str(base)}] * n_routed}
    if n_shared:
        cfg["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0}] * n_shared
    return moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=0)


def _llama_cpp_status(layout, n_routed, n_shared):
    shape = MoEShape(n_routed, 2, I, n_shared, I * n_shared)
    return next(s for s in layout.runtime_report(shape) if s.runtime == LLAMA_CPP)


def _expected_tensors(name, n_routed, n_shared):
    per_layer = {"attn_norm": (H,), "attn_q": (H, H), "attn_k": (H // 2, H), "attn_v": (H // 2, H),
                 "attn_output": (H, H), "ffn_norm": (H,), "ffn_gate_inp": (n_routed, H),
                 "ffn_gate_exps": (n_routed, I, H), "ffn_up_exps": (n_routed, I, H),
                 "ffn_down_exps": (n_routed, H, I)}
    if name == "qwen3":
        per_layer.update({"attn_q_norm": (H // 4,), "attn_k_norm": (H // 4,)})
    if name == "qwen":
        per_layer.update({"attn_q.bias": (H,), "attn_k.bias": (H // 2,), "attn_v.bias": (H // 2,),
                          "ffn_gate_inp_shexp": (1, H)})
    if n_shared:
        per_layer.update({"ffn_gate_shexp": (I * n_shared, H), "ffn_up_shexp": (I * n_shared, H),
                          "ffn_down_shexp": (H, I * n_shared)})
    tensors = {"token_embd.weight": (50257, H), "output_norm.weight": (H,), "output.weight": (50257, H)}
    for layer in range(2):
        for t, shape in per_layer.items():
            tensors[f"blk.{layer}.{t}" + ("" if t.endswith(".bias") else ".weight")] = shape
    return tensors


@pytest.mark.parametrize("name,n_routed,n_shared,family", CASES,
                         ids=[f"{c[0]}-{c[1]}x-{c[2]}shared" for c in CASES])
def test_converter_reads_every_layout(bases, tmp_path, name, n_routed, n_shared, family):
    layout = layout_named(name)
    out = tmp_path / "out"
    _build(bases[family], out, name, n_routed, n_shared)
    status = _llama_cpp_status(layout, n_routed, n_shared)
    done = kit.convert(out, tmp_path / "model.gguf")
    if status.status == FAILS:  # the declared refusal is what llama.cpp's converter really does
        assert done.returncode != 0 and "struct.error" in done.stderr, done.stderr[-2000:]
        return
    assert done.returncode == 0, done.stderr[-3000:]
    meta, tensors = kit.read_gguf(tmp_path / "model.gguf")
    arch = ARCH[name]
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.expert_count"] == n_routed
    assert meta[f"{arch}.expert_used_count"] == 2
    assert meta[f"{arch}.block_count"] == 2
    if name == "deepseek":
        assert meta[f"{arch}.expert_shared_count"] == n_shared
        assert meta[f"{arch}.leading_dense_block_count"] == 0
    if name == "qwen":
        assert meta[f"{arch}.expert_shared_feed_forward_length"] == I * n_shared
    if name != "mixtral":
        assert meta[f"{arch}.expert_feed_forward_length"] == I
    # norm_topk_prob does not reach the GGUF: the graph decides, which is why the runtime facts exist
    assert not [k for k in meta if "expert_weights_norm" in k]
    assert tensors == _expected_tensors(name, n_routed, n_shared)
    assert meta["tokenizer.ggml.pre"] == "gpt-2"

