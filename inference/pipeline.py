"""The serving runtime: prompts -> images with ONNX Runtime alone (no torch import).

Public API::

    from inference.pipeline import Pipeline
    from inference.images import make_grid, upscale, png_bytes

    pipe = Pipeline.load("bundles/dalle-mini", threads=0, provider="auto")   # verifies the bundle
    # Pipeline.load(bundle_dir, *, threads=0, provider="auto"|"cpu"|"cuda", verify=True, spin=False)
    images = pipe.generate(["a red circle", "a blue star"], n_images=4, seeds=[1, 2],
                           condition_scale=10.0, top_k=50, top_p=1.0, temperature=1.0)
    # -> [[4 PIL images for prompt 0], [4 for prompt 1]], all 8 images in one decoder batch
    post = make_grid(images[0])                                   # 2x2 grid

``n_images`` may be a list (one count per prompt); ``seeds`` one int per prompt (the same prompt,
seed and image index always give the same image, whatever else is in the batch) or None (random
seeds, see ``Pipeline.last_seeds``). Unset sampling settings come from the bundle's manifest.
``Pipeline.prepare(prompts)`` normalises and tokenises without generating, so a caller can reject
empty prompts or warn about truncated ones first; both ``generate`` and ``prepare`` raise
``PromptError`` for a prompt that is empty after normalisation. ``generate_codes`` returns codes
instead of images (``decode`` turns codes into images); ``start`` returns a ``Generation`` whose
decoder steps run one per iteration (progress, cancellation, interleaving). A Pipeline is not
thread-safe: use it from one thread (the bot's worker thread).

How a request runs: the encoder graph sees the unconditional row once plus one row per prompt and
returns every layer's cross-attention keys/values; rows are then laid out as 2B decoder rows
(B unconditional, then B conditional); the decoder graph runs image_length steps with a
self-attention KV cache held in preallocated buffers bound once with IO binding (per step only the
position changes and the new keys/values are copied into column t); numpy does guidance and sampling;
the VQGAN graph turns codes into pixels. Bundles exported with ``--cache sample`` (for GPUs) sample
inside the decoder graph instead, exactly as the numpy sampler does (same uniforms, same codes):
each step's outputs are the next step's inputs in buffers on the device, so no step waits on the
host, and on CUDA each step is captured once per batch size and replayed as a CUDA graph.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from .bundle import (
    DECODER_FIXED_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, GRAPHS, SAMPLER_INPUTS, SAMPLER_OUTPUTS, TOKENIZER_FILES,
    VQGAN_INPUTS, VQGAN_OUTPUTS, WORD_FREQUENCY_FILE, Bundle, decoder_kv_inputs,
)
from .errors import BundleError, InferenceError, PromptError
from .images import to_pil
from .sampling import SamplingParams, guide, image_uniforms, sample
from .text import HashtagSplitter, TextNormalizer
from .tokenizer import BartTokenizer

_log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000   # longer input is cut before normalisation (it would be truncated anyway)
MAX_GRAPH_SIZES = 4       # batch sizes whose decoder buffers (and CUDA graphs) are kept at once


@dataclass(frozen=True)
class PreparedPrompt:
    text: str              # as given
    normalized: str        # after dalle-mini's normaliser
    ids: np.ndarray        # (T,) int64
    mask: np.ndarray       # (T,) int64
    truncated: int         # BPE pieces dropped to fit the model's text length


def available_providers() -> list[str]:
    return ort.get_available_providers()


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip wheels when that is how they were installed."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - a system-wide CUDA install does not need it
            _log.debug("onnxruntime.preload_dlls: %s", e)


def _session_options(threads: int, spin: bool, prepack: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def _session(path: Path, opts: ort.SessionOptions, providers: list[str], cuda_graph: bool) -> ort.InferenceSession:
    try:
        if cuda_graph:
            try:
                return ort.InferenceSession(str(path), opts, providers=[
                    ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *providers[1:]])
            except Exception as e:  # noqa: BLE001 - fall back to plain runs
                _log.warning("CUDA graphs refused for %s (%s); running the decoder without them",
                             path.name, str(e).splitlines()[0][:200])
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0][:200]}); "
                          "re-export the bundle") from None


def _cuda_graph_enabled(sess: ort.InferenceSession) -> bool:
    opts = sess.get_provider_options().get("CUDAExecutionProvider", {})
    return str(opts.get("enable_cuda_graph", "0")) == "1"


def _providers(provider: str) -> list[str]:
    have = ort.get_available_providers()
    if provider not in ("auto", "cpu", "cuda"):
        raise InferenceError(f"unknown provider {provider!r}; use auto, cpu or cuda")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in have:
        _preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        raise InferenceError(f"provider cuda is not available in this onnxruntime (have: {', '.join(have)}); "
                             "install onnxruntime-gpu for cuda, or use --provider cpu")
    return ["CPUExecutionProvider"]


class Pipeline:
    def __init__(self, bundle: Bundle, sessions: dict[str, ort.InferenceSession], tokenizer: BartTokenizer,
                 normalizer: TextNormalizer, device: str) -> None:
        self.bundle = bundle
        self.config = bundle.model
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.normalizer = normalizer
        self.device = device                     # "cpu" or "cuda": where the decoder's caches live
        self.last_seeds: list[int] = []
        dec = sessions["decoder"]
        past = next(i for i in dec.get_inputs() if i.name == "past_key_0")
        self._kv_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        self._present = any(o.name.startswith("present_") for o in dec.get_outputs())
        self._sampler = any(o.name == SAMPLER_OUTPUTS[0] for o in dec.get_outputs())
        self.cuda_graph = False          # set by load(): decoder steps replayed as CUDA graphs
        self._graph_states: dict[int, _SamplerState] = {}   # rows -> buffers (fixed addresses) + bindings
        self._plain_decoder: Callable[[], ort.InferenceSession] | None = None   # the decoder without CUDA graphs
        self._next_graph_id = 1

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | Path, *, threads: int = 0, provider: str = "auto", verify: bool = True,
             spin: bool = False, cuda_graph: bool = True) -> "Pipeline":
        """Open and verify a bundle and create the three sessions.

        threads: intra-op threads per session (0 = onnxruntime's default, all cores).
        provider: "auto" (CUDA when onnxruntime-gpu sees a GPU, else CPU), "cpu" or "cuda".
        verify: re-hash every file against the manifest (set False only for trusted, large bundles).
        spin: let onnxruntime's idle worker threads busy-wait for work. Off by default: on a machine
        shared with the bot (or anything else) spinning threads steal the cores they wait for;
        measured on the 2-core dev box, DALL·E Mini decoder steps ran ~1.6x faster without it.
        cuda_graph: on CUDA, for a bundle whose decoder samples on the device (``--cache sample``),
        capture each decoder step once per batch size and replay it as a CUDA graph (no per-kernel
        launch cost). Falls back to plain runs, with a warning, where onnxruntime refuses.
        """
        bundle = Bundle.open(bundle_dir, verify=verify)
        providers = _providers(provider)
        sessions = {}
        for part in GRAPHS:
            # The encoder runs once per request: skip weight pre-packing there (it pays back over many
            # runs). Peak memory at batch 1 does not change with it (DALL·E Mini: 2.0 GB either way,
            # `python -m inference.bench memory`): the decoder's working set sets the peak.
            opts = _session_options(threads, spin, prepack=part != "encoder")
            graphed = (part == "decoder" and cuda_graph and bundle.sampler_kmax is not None
                       and providers[0] == "CUDAExecutionProvider")
            sessions[part] = _session(bundle.graph(part), opts, providers, graphed)
            if part == "decoder":
                plain = functools.partial(_session, bundle.graph(part), opts, providers, False)
        device = "cuda" if sessions["decoder"].get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        cfg = bundle.model
        _check_interfaces(bundle, sessions)
        tok = BartTokenizer(bundle.path(TOKENIZER_FILES["vocab"]), bundle.path(TOKENIZER_FILES["merges"]),
                            text_length=cfg.text_length, bos_id=cfg.text_bos_id, pad_id=cfg.text_pad_id,
                            eos_id=cfg.text_eos_id)
        if tok.vocab_size > cfg.text_vocab_size:
            raise BundleError(f"vocab.json has token ids up to {tok.vocab_size - 1} but the encoder only "
                              f"{cfg.text_vocab_size} rows; "
                              "the bundle's tokenizer does not belong to its model")
        hashtags = HashtagSplitter.from_file(bundle.path(WORD_FREQUENCY_FILE)) if bundle.has(WORD_FREQUENCY_FILE) else None
        graph = _cuda_graph_enabled(sessions["decoder"])
        _log.info("loaded bundle %s (%s, %s) on %s%s", bundle.name, cfg.d_model, bundle.dtype, device,
                  ", decoder steps as CUDA graphs" if graph else "")
        pipe = cls(bundle, sessions, tok, TextNormalizer(hashtags), device)
        pipe.cuda_graph = graph
        pipe._plain_decoder = plain
        return pipe

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """Manifest defaults, with the given non-None settings on top."""
        d = self.bundle.sampling.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return SamplingParams(**d)
        except (TypeError, ValueError) as e:
            raise InferenceError(f"bad sampling settings: {e}") from None

    # ----------------------------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[str]) -> list[PreparedPrompt]:
        out = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise PromptError(f"prompt {i} is not text")
            norm = self.normalizer(text[:MAX_PROMPT_CHARS])
            if not norm.strip(" ,\""):
                raise PromptError(f"prompt {i} ({text[:40]!r}) is empty after normalisation: "
                                  "write a few words the model can read (Latin, Greek or Cyrillic letters)")
            enc = self.tokenizer.encode(norm)
            if enc.truncated:
                _log.warning("prompt %d is too long for the model (%d text tokens): %d tokens were dropped",
                             i, self.config.text_length, enc.truncated)
            out.append(PreparedPrompt(text, norm, enc.ids, enc.mask, enc.truncated))
        return out

    def generate(self, prompts: Sequence[str], n_images: int | Sequence[int] = 1,
                 seeds: int | Sequence[int] | None = None, *, condition_scale: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 max_images_per_run: int | None = None) -> list[list[Image.Image]]:
        """Images for each prompt, all in one encoder, decoder and VQGAN batch (see module doc), or in
        consecutive runs of at most ``max_images_per_run`` images (see ``generate_codes``)."""
        codes = self.generate_codes(prompts, n_images, seeds, condition_scale=condition_scale, top_k=top_k,
                                    top_p=top_p, temperature=temperature, progress=progress,
                                    max_images_per_run=max_images_per_run)
        images = self.decode(np.concatenate(codes)) if codes else []
        out, at = [], 0
        for c in codes:
            out.append(images[at:at + len(c)])
            at += len(c)
        return out

    def generate_codes(self, prompts: Sequence[str], n_images: int | Sequence[int] = 1,
                       seeds: int | Sequence[int] | None = None, *, condition_scale: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       max_images_per_run: int | None = None) -> list[np.ndarray]:
        """Like ``generate`` but returns the image codes: one (n_images, N) int64 array per prompt.
        ``progress(step, steps)`` is called after each decoder step; an exception it raises stops
        the run (a way to cancel).

        ``max_images_per_run`` (None or 0: no cap) bounds the decoder batch: the images, in order,
        are generated in consecutive runs of at most that many (a prompt's images may span runs).
        Each image keeps its own random stream (seed, index within its prompt), so the codes are the
        same whatever the cap. ``progress`` then counts the steps of all runs: (done, runs * N)."""
        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, not one string")
        if not prompts:
            return []
        if max_images_per_run is not None and (isinstance(max_images_per_run, bool)
                                               or not isinstance(max_images_per_run, int) or max_images_per_run < 0):
            raise InferenceError(f"max_images_per_run must be a whole number >= 0, got {max_images_per_run!r}")
        sampling = dict(condition_scale=condition_scale, top_k=top_k, top_p=top_p, temperature=temperature)
        counts = [n_images] * len(prompts) if isinstance(n_images, int) else list(n_images)
        cap = max_images_per_run or 0
        if not cap or sum(counts) <= cap or len(counts) != len(prompts) or any(n < 1 for n in counts):
            return self.start(prompts, n_images, seeds, **sampling).run(progress)   # one run (start checks)
        seeds = self._seeds(prompts, seeds)
        # consecutive runs of at most cap images: (prompt, first image, count) pieces
        runs: list[list[tuple[int, int, int]]] = [[]]
        room = cap
        for p, n in enumerate(counts):
            first = 0
            while first < n:
                if not room:
                    runs.append([])
                    room = cap
                take = min(room, n - first)
                runs[-1].append((p, first, take))
                first += take
                room -= take
        steps = self.config.image_length
        out: list[list[np.ndarray]] = [[] for _ in prompts]
        for r, pieces in enumerate(runs):
            def report(t: int, _n: int, done: int = r * steps) -> None:
                if progress:
                    progress(done + t, len(runs) * steps)
            codes = self.start([prompts[p] for p, _, _ in pieces], [k for _, _, k in pieces],
                               [seeds[p] for p, _, _ in pieces], first_image=[f for _, f, _ in pieces],
                               **sampling).run(report)
            for (p, _, _), c in zip(pieces, codes, strict=True):
                out[p].append(c)
        self.last_seeds = seeds
        return [np.concatenate(c) for c in out]

    def _seeds(self, prompts: Sequence[str], seeds: int | Sequence[int] | None) -> list[int]:
        if seeds is None:
            seeds = [secrets.randbits(31) for _ in prompts]
        elif isinstance(seeds, int):
            seeds = [seeds] * len(prompts)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise InferenceError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if any(not 0 <= s < 2**63 for s in seeds):
            raise InferenceError("seeds must be between 0 and 2**63 - 1")
        return seeds

    def start(self, prompts: Sequence[str], n_images: int | Sequence[int] = 1,
              seeds: int | Sequence[int] | None = None, *, condition_scale: float | None = None,
              top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
              first_image: Sequence[int] | None = None) -> "Generation":
        """Check the prompts, run the encoder and return a ``Generation`` whose decoder steps run as
        it is iterated (``generate_codes`` runs it to the end). ``first_image`` (one per prompt,
        default 0): the index, within its prompt, of the first image made here, so a prompt's images
        can be made in several runs with the random streams they get in one."""
        if isinstance(prompts, str) or not prompts:
            raise PromptError("prompts must be a non-empty list of strings")
        counts = [n_images] * len(prompts) if isinstance(n_images, int) else list(n_images)
        if len(counts) != len(prompts) or any(n < 1 for n in counts):
            raise InferenceError("n_images must be >= 1, one count per prompt")
        firsts = [0] * len(prompts) if first_image is None else [int(f) for f in first_image]
        if len(firsts) != len(prompts) or any(f < 0 for f in firsts):
            raise InferenceError("first_image must be >= 0, one index per prompt")
        seeds = self._seeds(prompts, seeds)
        self.last_seeds = seeds
        params = self.sampling_params(condition_scale=condition_scale, top_k=top_k, top_p=top_p,
                                      temperature=temperature)
        prepared = self.prepare(prompts)
        cfg = self.config
        n_steps = cfg.image_length
        uniforms = np.concatenate([image_uniforms([s], f + n, n_steps)[f:]                        # (B, N)
                                   for s, f, n in zip(seeds, firsts, counts)])

        # Encoder: row 0 = unconditional, row 1 + p = prompt p.
        uncond = self.tokenizer.unconditional()
        ids = np.stack([uncond.ids, *(p.ids for p in prepared)])
        mask = np.stack([uncond.mask, *(p.mask for p in prepared)])
        cross_small = self.sessions["encoder"].run(None, dict(zip(ENCODER_INPUTS, (ids, mask))))[0]
        b = sum(counts)
        rows = np.array([0] * b + [1 + p for p, n in enumerate(counts) for _ in range(n)])
        cross_kv = np.ascontiguousarray(cross_small[:, :, rows])        # (L, 2, R, H, T, Dh)
        text_mask = np.ascontiguousarray(mask[rows])                    # (R, T)
        codes = np.zeros((b, n_steps), dtype=np.int64)                  # (B, N), filled step by step
        if self._sampler:
            loop = self._decode_sampled
        else:
            loop = self._decode_present if self._present else self._decode_inplace
        return Generation(codes, counts, loop(cross_kv, text_mask, uniforms, params, codes))

    # ----------------------------------------------------------------------------------------------
    def _decode_inplace(self, cross_kv: np.ndarray, text_mask: np.ndarray, uniforms: np.ndarray,
                        params: SamplingParams, codes: np.ndarray) -> Iterator[int]:
        """Decoder loop for graphs that return only this step's K/V: the cache is one numpy array
        whose per-layer slices are bound as inputs once; step t copies new_kv into column t."""
        cfg, sess = self.config, self.sessions["decoder"]
        layers, _, r, h, _, dh = cross_kv.shape
        b, n_steps = r // 2, cfg.image_length
        cache = np.zeros((layers, 2, r, h, n_steps, dh), dtype=self._kv_dtype)   # (L, 2, R, H, N, Dh)
        token = np.full(r, cfg.decoder_start_token_id, dtype=np.int64)
        position = np.zeros(1, dtype=np.int64)
        logits = np.empty((r, cfg.decoder_vocab_size), dtype=np.float32)
        new_kv = np.empty((layers, 2, r, h, dh), dtype=self._kv_dtype)
        kv = [cache[i, j] for i in range(layers) for j in range(2)] + \
             [cross_kv[i, j].astype(self._kv_dtype, copy=False) for i in range(layers) for j in range(2)]
        io = sess.io_binding()
        for name, arr in [("token", token), ("position", position), ("text_mask", text_mask),
                          *zip(decoder_kv_inputs(layers), kv)]:
            _bind(io.bind_input, name, arr)
        for name, arr in zip(DECODER_OUTPUTS, (logits, new_kv)):
            _bind(io.bind_output, name, arr)
        for t in range(n_steps):
            position[0] = t
            sess.run_with_iobinding(io)
            cache[:, :, :, :, t] = new_kv
            codes[:, t] = sample(guide(logits, cfg.num_codes, params.condition_scale), uniforms[:, t], params)
            token[:b] = token[b:] = codes[:, t]
            yield t + 1

    def _decode_present(self, cross_kv: np.ndarray, text_mask: np.ndarray, uniforms: np.ndarray,
                        params: SamplingParams, codes: np.ndarray) -> Iterator[int]:
        """Decoder loop for graphs that return the updated caches (``present_*``): two sets of cache
        buffers on the session's device, swapped each step; two IO bindings prepared once."""
        cfg, sess = self.config, self.sessions["decoder"]
        layers, _, r, h, _, dh = cross_kv.shape
        b, n_steps = r // 2, cfg.image_length
        dev = self.device
        # On CPU an OrtValue wraps the numpy array's memory: every buffer needs its own array, kept alive.
        host = [np.zeros((r, h, n_steps, dh), dtype=self._kv_dtype) for _ in range(4 * layers)]
        host += [np.ascontiguousarray(cross_kv[i, j], dtype=self._kv_dtype) for i in range(layers) for j in range(2)]
        vals = [ort.OrtValue.ortvalue_from_numpy(a, dev, 0) for a in host]
        if dev != "cpu":
            del host                                  # copied to the device
        bufs = [vals[:2 * layers], vals[2 * layers:4 * layers]]
        cross = vals[4 * layers:]
        token = np.full(r, cfg.decoder_start_token_id, dtype=np.int64)
        position = np.zeros(1, dtype=np.int64)
        logits = np.empty((r, cfg.decoder_vocab_size), dtype=np.float32)
        names = decoder_kv_inputs(layers)
        present = [n.replace("past_", "present_") for n in names[:2 * layers]]
        bindings = []
        for src, dst in ((0, 1), (1, 0)):
            io = sess.io_binding()
            for name, arr in [("token", token), ("position", position), ("text_mask", text_mask)]:
                _bind(io.bind_input, name, arr)
            for name, val in zip(names, bufs[src] + cross):
                io.bind_ortvalue_input(name, val)
            _bind(io.bind_output, "logits", logits)
            for name, val in zip(present, bufs[dst]):
                io.bind_ortvalue_output(name, val)
            bindings.append(io)
        for t in range(n_steps):
            position[0] = t
            io = bindings[t % 2]
            io.synchronize_inputs()
            sess.run_with_iobinding(io)
            io.synchronize_outputs()
            codes[:, t] = sample(guide(logits, cfg.num_codes, params.condition_scale), uniforms[:, t], params)
            token[:b] = token[b:] = codes[:, t]
            yield t + 1

    def _decode_sampled(self, cross_kv: np.ndarray, text_mask: np.ndarray, uniforms: np.ndarray,
                        params: SamplingParams, codes: np.ndarray) -> Iterator[int]:
        """Decoder loop for graphs that sample on the device (cache="sample"): each step's outputs
        (next token, next position, codes so far, updated caches) are the next step's inputs, in two
        buffer sets on the session's device swapped every step; nothing crosses to the host until
        the codes are read after the last step. With ``cuda_graph`` each of the two bindings is
        captured once per row count and replayed, so its buffers are kept (and refilled in place)
        for the next request of the same size."""
        cfg, sess = self.config, self.sessions["decoder"]
        layers, _, r, h, _, dh = cross_kv.shape
        b, n_steps = r // 2, cfg.image_length
        n = cfg.num_codes
        k = n if params.top_k == 0 else min(params.top_k, n)
        kmax = self.bundle.sampler_kmax or n
        if k > kmax:
            raise InferenceError(f"this bundle samples on the device from the {kmax} most likely codes: "
                                 f"top_k must be 1..{kmax} (got {params.top_k}); "
                                 "or export the bundle with --cache present to sample on the host")
        inputs = {
            "text_mask": text_mask, "uniforms": np.ascontiguousarray(uniforms, dtype=np.float64),
            "condition_scale": np.array([params.condition_scale], np.float32),
            "temperature": np.array([params.temperature], np.float32),
            "top_k": np.array([k], np.int64), "top_p": np.array([params.top_p], np.float64),
            "token": np.full(r, cfg.decoder_start_token_id, dtype=np.int64), "position": np.zeros(1, np.int64),
        }
        cross = [np.ascontiguousarray(cross_kv[i, j], dtype=self._kv_dtype) for i in range(layers) for j in range(2)]
        state = self._graph_states.get(r) if self.cuda_graph else None
        if state is None or state.busy:
            # a new size, or a generation of this size is still running (generations may interleave):
            # fresh buffers; only the first set for a size is captured, the others run plainly
            keep = self.cuda_graph and state is None
            if keep and len(self._graph_states) >= MAX_GRAPH_SIZES:
                self._evict_graph_size()
            state = _SamplerState.create(sess, self.device, inputs, cross, (b, n_steps), layers,
                                         (r, h, n_steps, dh), self._kv_dtype,
                                         first_graph_id=self._next_graph_id if keep else None)
            if keep:
                self._graph_states[r] = state
                self._next_graph_id += 2
        else:
            state.refill(inputs, cross)
            self._graph_states[r] = self._graph_states.pop(r)      # most recently used last
        state.busy = True
        try:
            for t in range(n_steps):
                try:
                    sess.run_with_iobinding(state.bindings[t % 2], state.run_options[t % 2])
                except Exception as e:  # noqa: BLE001 - a capture onnxruntime cannot do: run without graphs
                    if not (self.cuda_graph and t < 2 and self._plain_decoder):
                        raise
                    _log.warning("CUDA graph capture failed (%s); running the decoder without CUDA graphs",
                                 str(e).splitlines()[0][:200])
                    self.sessions["decoder"] = self._plain_decoder()
                    self.cuda_graph, self._graph_states = False, {}
                    yield from self._decode_sampled(cross_kv, text_mask, uniforms, params, codes)
                    return
                if t == n_steps - 1:
                    codes[:] = state.codes[n_steps % 2].numpy()     # before the last yield, as the host loops
                yield t + 1
        finally:
            state.busy = False

    def _evict_graph_size(self) -> None:
        """Drop the least recently used idle batch size's buffers (each holds a full set of KV
        caches on the device: ~24 MiB per row for DALL·E Mini in fp16). Its captured graphs stay
        in onnxruntime but are never replayed: graph ids are not reused."""
        for rows, state in self._graph_states.items():
            if not state.busy:
                del self._graph_states[rows]
                return

    # ----------------------------------------------------------------------------------------------
    def decode_pixels(self, codes: np.ndarray, batch: int | None = None) -> np.ndarray:
        """codes (B, N) -> pixels (B, S, S, 3) float32 in [0, 1], in chunks of ``batch`` images.

        Default chunk: 1 image on CPU (the VQGAN's full-resolution activations are memory bound:
        one at a time is as fast per image and keeps peak memory low), 8 on a GPU."""
        batch = batch or (8 if self.device == "cuda" else 1)
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.config.image_length:
            raise InferenceError(f"codes must be (B, {self.config.image_length})")
        if codes.size and (codes.min() < 0 or codes.max() >= self.bundle.vqgan.n_embed):
            raise InferenceError(f"codes must lie in 0..{self.bundle.vqgan.n_embed - 1}")
        sess = self.sessions["vqgan"]
        return np.concatenate([sess.run(None, {VQGAN_INPUTS[0]: codes[i:i + batch]})[0]
                               for i in range(0, len(codes), batch)])

    def decode(self, codes: np.ndarray) -> list[Image.Image]:
        return to_pil(self.decode_pixels(codes))


@dataclass
class Generation:
    """A started request: iterate ``steps`` to run decoder steps one by one (each yields the number
    done so far), or call ``run``. ``codes`` (B, N) holds the sampled codes; ``counts`` images per prompt."""

    codes: np.ndarray
    counts: list[int]
    steps: Iterator[int]

    def run(self, progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        n = self.codes.shape[1]
        for t in self.steps:
            if progress:
                progress(t, n)
        return np.split(self.codes, np.cumsum(self.counts)[:-1])


@dataclass
class _SamplerState:
    """Buffers and the two IO bindings of the device-sampling decoder loop. Set s (0 or 1) holds a
    step's inputs; the other set receives its outputs. Inputs that stay the same for a whole request
    (text mask, uniforms, sampling settings, cross K/V) are bound to both bindings."""

    values: dict[str, Any]               # fixed inputs: name -> OrtValue
    cross: list[Any]                     # cross K/V OrtValues
    codes: list[Any]                     # the two codes buffers (B, N)
    bindings: list[Any]
    run_options: list[Any]
    host: list[np.ndarray]               # on CPU, OrtValues wrap these arrays: keep them alive
    busy: bool = False                   # a generation is running on these buffers

    @classmethod
    def create(cls, sess: ort.InferenceSession, device: str, inputs: dict[str, np.ndarray], cross: list[np.ndarray],
               codes_shape: tuple[int, int], layers: int, cache_shape: tuple[int, ...], kv_dtype: Any,
               first_graph_id: int | None) -> "_SamplerState":
        """first_graph_id: the CUDA graph ids of the two bindings (first, first + 1), or None to run
        them without capture (graph id -1)."""
        host: list[np.ndarray] = []

        def value(a: np.ndarray) -> Any:
            a = np.array(a, copy=True, order="C")
            host.append(a)
            return ort.OrtValue.ortvalue_from_numpy(a, device, 0)

        fixed = {name: value(inputs[name]) for name in ("text_mask", *SAMPLER_INPUTS) if name != "codes"}
        token = [value(inputs["token"]), value(inputs["token"])]
        position = [value(inputs["position"]), value(inputs["position"])]
        codes = [value(np.zeros(codes_shape, np.int64)) for _ in range(2)]
        caches = [[value(np.zeros(cache_shape, kv_dtype)) for _ in range(2 * layers)] for _ in range(2)]
        cross_vals = [value(c) for c in cross]
        names = decoder_kv_inputs(layers)
        present = [nm.replace("past_", "present_") for nm in names[:2 * layers]]
        bindings, run_options = [], []
        for src, dst in ((0, 1), (1, 0)):
            io = sess.io_binding()
            io.bind_ortvalue_input(DECODER_FIXED_INPUTS[0], token[src])
            io.bind_ortvalue_input(DECODER_FIXED_INPUTS[1], position[src])
            io.bind_ortvalue_input("codes", codes[src])
            for name, val in fixed.items():
                io.bind_ortvalue_input(name, val)
            for name, val in zip(names, caches[src] + cross_vals):
                io.bind_ortvalue_input(name, val)
            for name, val in zip(SAMPLER_OUTPUTS, (token[dst], position[dst], codes[dst])):
                io.bind_ortvalue_output(name, val)
            for name, val in zip(present, caches[dst]):
                io.bind_ortvalue_output(name, val)
            bindings.append(io)
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", "-1" if first_graph_id is None else str(first_graph_id + src))
            run_options.append(ro)
        values = {**fixed, "token": token[0], "position": position[0]}
        if device != "cpu":
            host.clear()                  # copied to the device
        return cls(values, cross_vals, codes, bindings, run_options, host)

    def refill(self, inputs: dict[str, np.ndarray], cross: list[np.ndarray]) -> None:
        """A new request of the same size: new contents, same addresses (what a CUDA graph replays)."""
        for name, val in self.values.items():
            val.update_inplace(np.ascontiguousarray(inputs[name]))
        for val, c in zip(self.cross, cross):
            val.update_inplace(c)


def _check_interfaces(bundle: Bundle, sessions: dict[str, ort.InferenceSession]) -> None:
    """The graphs' fixed dimensions agree with the manifest (an edited manifest otherwise loads and
    then fails every request inside onnxruntime)."""
    cfg, vq = bundle.model, bundle.vqgan
    expect = [  # graph, input or output name, axis, manifest field, value
        ("encoder", ENCODER_INPUTS[0], 1, "model.text_length", cfg.text_length),
        ("decoder", "text_mask", 1, "model.text_length", cfg.text_length),
        ("decoder", "past_key_0", 2, "model.image_grid (squared)", cfg.image_length),
        ("decoder", DECODER_OUTPUTS[0], 1, "model.image_vocab_size (+ 1)", cfg.decoder_vocab_size),
        ("vqgan", VQGAN_INPUTS[0], 1, "model.image_grid (squared)", cfg.image_length),
        ("vqgan", VQGAN_OUTPUTS[0], 1, "vqgan.resolution", vq.resolution),
    ]
    for part, name, axis, field, value in expect:
        sess = sessions[part]
        args = {a.name: a for a in [*sess.get_inputs(), *sess.get_outputs()]}
        arg = args.get(name)
        if arg is None and name == DECODER_OUTPUTS[0] and SAMPLER_OUTPUTS[0] in args:
            continue               # a decoder that samples on the device returns no logits
        if arg is None:
            raise BundleError(f"{GRAPHS[part]} of {bundle.root} has no {name}: it is not the {part} graph of a "
                              "bundle (files swapped or replaced?); re-export the bundle")
        shape = arg.shape
        got = shape[axis] if len(shape) > axis else None
        if isinstance(got, int) and got != value:
            raise BundleError(f"{GRAPHS[part]} of {bundle.root} was exported for {name} dimension {got}, but "
                              f"{bundle.root / 'manifest.json'} says {field} = {value}: the manifest does not "
                              "match the graphs; re-export the bundle")


def _bind(method: Callable[..., None], name: str, arr: np.ndarray) -> None:
    """Bind a contiguous numpy array by address: onnxruntime reads/writes it in place on every run."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous to be bound")
    method(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
