"""Load a float32 model bundle's ONNX graphs back into the torch definitions (to train further).

The exporter keeps most parameter names as initializer names, but torch's ONNX export turns two
kinds of parameters into anonymous constants: every ``nn.Linear`` weight becomes a transposed
``val_N`` matrix feeding a MatMul, and every GroupNorm's gain and bias become ``val_N`` constants
feeding the Mul and Add after an InstanceNormalization. Both are recovered by order: the graphs list
their nodes in the order the torch modules ran during export, so the k-th MatMul with a constant
weight belongs to the k-th Linear called (forward hooks on the export wrappers give that order), and
the k-th InstanceNormalization to the k-th GroupNorm. The result is then checked against onnxruntime
on example inputs, so a graph laid out differently is an error, never silently wrong weights.

Used by ``dallebot train shapes --refine-from BUNDLE`` (:mod:`inference.training.refine`): the
shipped model's training checkpoints are not kept, its bundle is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bundle import Bundle, BundleError, decoder_kv_inputs
from ..export import DecoderStepGraph, EncoderGraph, ModelParts, example_inputs
from ..model import DalleBartDecoder, DalleBartEncoder, VQGANDecoder

PARITY_TOLERANCE = 1e-3


def _initializers(path: Path) -> tuple[object, dict[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))          # external data (NAME.onnx.data) is read from beside it
    return model, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _call_order(module: nn.Module, kind: type | tuple[type, ...], run) -> list[str]:
    """Names of ``kind`` submodules in the order ``run()`` calls them (first call of each)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
             for name, m in module.named_modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def _matmul_weights(model, inits: dict[str, np.ndarray]) -> list[str]:
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            consts = [i for i in node.input if i in inits and inits[i].ndim == 2]
            if consts:
                out.append(consts[0])
    return out


def _norm_constants(model, inits: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gain, bias) after each InstanceNormalization, in node order (GroupNorm as exported)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = []
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        gain = bias = None
        cur = node
        for _ in range(6):
            nxt = consumers.get(cur.output[0], [])
            if len(nxt) != 1:
                break
            cur = nxt[0]
            consts = [inits[i] for i in cur.input if i in inits]
            if cur.op_type == "Mul" and consts:
                gain = consts[0]
            elif cur.op_type == "Add" and consts:
                bias = consts[0]
                break
        if gain is None or bias is None:
            raise BundleError(f"{getattr(model.graph, 'name', 'graph')}: no gain/bias after a group norm")
        out.append((gain.reshape(-1), bias.reshape(-1)))
    return out


def _layer_norms(model, inits: dict[str, np.ndarray]) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """(scale, bias) of each LayerNormalization, in node order. The exporter stores identical
    constants once (every zero bias of an untrained model is one initializer), so layer norms are
    matched by order, not by name."""
    out = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            scale = inits.get(node.input[1]) if len(node.input) > 1 else None
            bias = inits.get(node.input[2]) if len(node.input) > 2 else None
            out.append((scale, bias))
    return out


def _assign_layer_norms(wrapper: nn.Module, run, model, inits: dict[str, np.ndarray],
                        values: dict[str, torch.Tensor], what: str) -> None:
    from ..model.layers import BiasLayerNorm

    names = _call_order(wrapper, (nn.LayerNorm, BiasLayerNorm), run)
    nodes = _layer_norms(model, inits)
    if len(names) != len(nodes):
        raise BundleError(f"{what}: {len(nodes)} layer norms in the graph for {len(names)} in the model")
    for name, (scale, bias) in zip(names, nodes):
        module = wrapper.get_submodule(name)
        if isinstance(module, nn.LayerNorm):
            if scale is None or bias is None:
                raise BundleError(f"{what}: layer norm {name} has no constant scale and bias in the graph")
            values[name + ".weight"] = torch.from_numpy(scale.copy())
        elif bias is None:
            raise BundleError(f"{what}: layer norm {name} has no constant bias in the graph")
        values[name + ".bias"] = torch.from_numpy(bias.copy())


def _fill(module: nn.Module, values: dict[str, torch.Tensor], what: str) -> None:
    want = module.state_dict()
    missing = [k for k in want if k not in values]
    if missing:
        raise BundleError(f"{what}: cannot find {len(missing)} parameters in the graph "
                          f"(first: {missing[0]}); the bundle was not written by this exporter")
    for k, v in values.items():
        if k in want and tuple(want[k].shape) != tuple(v.shape):
            raise BundleError(f"{what}: parameter {k} has shape {tuple(v.shape)} in the graph, "
                              f"{tuple(want[k].shape)} in the model")
    module.load_state_dict({k: values[k] for k in want})


def _linears(wrapper: nn.Module, run, path: Path, extra_last: list[str] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    model, inits = _initializers(path)
    names = _call_order(wrapper, nn.Linear, run) + (extra_last or [])
    weights = _matmul_weights(model, inits)
    if len(names) != len(weights):
        raise BundleError(f"{path.name}: {len(weights)} weight matrices for {len(names)} linear layers; "
                          "the bundle was not written by this exporter")
    values = {k: torch.from_numpy(v.copy()) for k, v in inits.items()}
    for name, w in zip(names, weights):
        values[name + ".weight"] = torch.from_numpy(np.ascontiguousarray(inits[w].T))
    _assign_layer_norms(wrapper, run, model, inits, values, path.name)
    return values, inits


def load_parts(bundle_dir: str | Path, *, check: bool = True) -> ModelParts:
    """The bundle's encoder, decoder and VQGAN as torch modules (eval mode), parity-checked."""
    bundle = Bundle.open(bundle_dir, verify=True)
    if bundle.dtype != "float32":
        raise BundleError(f"{bundle.root}: only float32 bundles can be trained further (this one is "
                          f"{bundle.dtype}); export it again as float32")
    cfg = bundle.model
    encoder, decoder, vqgan = DalleBartEncoder(cfg), DalleBartDecoder(cfg), VQGANDecoder(bundle.vqgan)
    ex = example_inputs(cfg, 2)

    # encoder graph: the encoder's linears, then the decoder's cross-attention K/V projections
    enc_graph = EncoderGraph(encoder, decoder)
    values, inits = _linears(enc_graph, lambda: enc_graph(*ex["encoder"]), bundle.graph("encoder"))
    pos = "encoder.embed_positions.weight"
    if pos not in values:      # exported as a slice of the table: the only (T, D) constant left
        cands = [k for k, v in inits.items() if v.shape == tuple(encoder.embed_positions.weight.shape)
                 and not k.startswith(("encoder.", "decoder."))]
        if len(cands) != 1:
            raise BundleError(f"{bundle.graph('encoder').name}: cannot find the text position table")
        values[pos] = torch.from_numpy(inits[cands[0]].copy())
    _fill(encoder, {k[len("encoder."):]: v for k, v in values.items() if k.startswith("encoder.")}, "encoder")
    cross = {k[len("decoder."):]: v for k, v in values.items() if k.startswith("decoder.")}

    step_graph = DecoderStepGraph(decoder)
    values, _ = _linears(step_graph, lambda: step_graph(*ex["decoder"]), bundle.graph("decoder"),
                         extra_last=["decoder.lm_head"])       # F.linear in logits(): no hook
    dec_values = {k[len("decoder."):]: v for k, v in values.items() if k.startswith("decoder.")}
    _fill(decoder, {**dec_values, **cross}, "decoder")

    model, inits = _initializers(bundle.graph("vqgan"))
    values = {k[len("vqgan."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("vqgan.")}
    norms = _call_order(vqgan, nn.GroupNorm, lambda: vqgan(ex["vqgan"][0]))
    consts = _norm_constants(model, inits)
    if len(norms) != len(consts):
        raise BundleError(f"{bundle.graph('vqgan').name}: {len(consts)} group norms for {len(norms)} in the model")
    for name, (gain, bias) in zip(norms, consts):
        values[name + ".weight"] = torch.from_numpy(gain.copy())
        values[name + ".bias"] = torch.from_numpy(bias.copy())
    _fill(vqgan, values, "vqgan")

    parts = ModelParts(encoder, decoder, vqgan).eval()
    if check:
        check_parity(bundle, parts)
    return parts


def check_parity(bundle: Bundle, parts: ModelParts, tolerance: float = PARITY_TOLERANCE) -> dict[str, float]:
    """Max |difference| between onnxruntime and the torch modules on example inputs, per graph."""
    import onnxruntime as ort

    cfg = parts.config
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.text_vocab_size, (2, cfg.text_length))
    ids[:, 0], ids[0, 6], ids[1, 1] = cfg.text_bos_id, cfg.text_eos_id, cfg.text_eos_id
    mask = np.zeros_like(ids)
    mask[0, :7], mask[1, :2] = 1, 1
    ids = np.where(mask == 1, ids, cfg.text_pad_id).astype(np.int64)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def run(part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sess = ort.InferenceSession(str(bundle.graph(part)), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    diffs = {}
    cross = run("encoder", {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        ref = parts.decoder.cross_kv(parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    diffs["encoder"] = float(np.abs(cross - ref).max())
    layers, h, n, dh = cfg.decoder_layers, cfg.decoder_heads, cfg.image_length, cfg.head_dim
    past = [rng.standard_normal((2, h, n, dh)).astype(np.float32) for _ in range(2 * layers)]
    cross_list = [np.ascontiguousarray(cross[i // 2, i % 2]) for i in range(2 * layers)]
    token = rng.integers(0, cfg.num_codes, 2).astype(np.int64)
    position = np.array([n // 2], np.int64)
    feeds = {"token": token, "position": position, "text_mask": mask,
             **dict(zip(decoder_kv_inputs(layers), past + cross_list))}
    logits = run("decoder", feeds)
    with torch.no_grad():
        ref = DecoderStepGraph(parts.decoder)(torch.from_numpy(token), torch.from_numpy(position),
                                              torch.from_numpy(mask), *map(torch.from_numpy, past + cross_list))[0]
    diffs["decoder"] = float(np.abs(logits - ref.numpy()).max())
    codes = rng.integers(0, parts.vqgan.cfg.n_embed, (2, cfg.image_length)).astype(np.int64)
    pixels = run("vqgan", {"codes": codes})
    with torch.no_grad():
        diffs["vqgan"] = float(np.abs(pixels - parts.vqgan(torch.from_numpy(codes)).numpy()).max())
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise BundleError(f"{bundle.root}: the weights read back from the graphs do not reproduce them "
                          f"(max difference {bad}); the bundle was not written by this exporter")
    return diffs
