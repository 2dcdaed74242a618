"""Bytes on the wire and prediction changes of the int8 hidden-state encoding against float16.

For every sample of the stream (IMDb test, shuffled with seed 0, the first --samples) and every split
layer k = 1..L-1, the hidden state after layer k goes through the path the workers use: trimmed to the
sample's real length, encoded by :func:`stream.messages.encode_hidden` into a full offload message
(:func:`stream.messages.encode`, as the device stage sends it), decoded by :func:`stream.messages.decode`
and :func:`stream.messages.decode_hidden` (as the edge/cloud stage reads it), collated and resumed from
layer k to L. Each encoding's exit probabilities are compared with float16's (the reference wire format;
``--with-f32`` adds the uninterrupted float32 pass). A flip is a final-exit prediction that differs.
Prints a table per split layer and writes --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import zlib
from pathlib import Path

import numpy as np

BYTES_TARGET = 0.55
FLIP_TARGET = 0.005


def offload_message(sample_id: str, hidden: np.ndarray, encoding: str, resume_layer: int, num_layers: int) -> bytes:
    """An offload message shaped like the device stage's (policy reference, context, trace, decision)."""
    from stream import messages
    payload = {"id": sample_id, "source": "imdb", "seq": 0, "resume_layer": resume_layer, "run_to": num_layers,
               "threshold": None,
               "policy": {"name": "splitee", "params": {}, "cost": "splitee", "cost_overrides": {}, "version": 1,
                          "ns": "splitee:0123456789ab"},
               "context": {"arm": resume_layer, "ns": "splitee:0123456789ab"},
               "trace": {"device_layers": resume_layer, "device_exits": 1, "tier": "cloud"},
               "decision": {"layer": resume_layer, "confidence": 0.5}, "embedding_distance": None,
               "ts": time.time(), "latency_device_ms": 10.0,
               **messages.encode_hidden(hidden, encoding)}
    return messages.encode("offload", payload)


def received(data: bytes, model, max_len: int):
    """What the remote stage resumes from: the decoded, checked float32 state as a [1, t, H] tensor and mask."""
    import torch

    from stream import messages
    msg = messages.decode("offload", data)
    hidden = messages.decode_hidden(msg, where=f"offload {msg['id']!r}", last_dim=model.hidden_size,
                                    max_tokens=max_len)
    h = torch.from_numpy(hidden)[None]
    return h, torch.ones(1, h.shape[1], dtype=torch.long)


def measure(model, texts: list[str], max_len: int, batch_size: int, encodings: tuple[str, ...],
            with_f32: bool, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    L = model.num_layers
    names = list(encodings) + (["f32"] if with_f32 else [])
    sizes = {e: [] for e in encodings}
    tensor_sizes = {e: [] for e in encodings}
    zlib_i8: list[float] = []
    tokens: list[int] = []
    # per split k, per encoding (not f16): max |Δp| over exits k+1..L, final-exit flips, flips at any exit
    worst = {e: {k: 0.0 for k in range(1, L)} for e in names if e != "f16"}
    flips = {e: {k: 0 for k in range(1, L)} for e in names if e != "f16"}
    any_exit_flips = {e: {k: 0 for k in range(1, L)} for e in names if e != "f16"}
    batches = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="offload", unit="batch", disable=not progress):
            batch = model.tokenize(texts[start:start + batch_size], max_len=max_len)
            hidden, mask = model.start(batch)
            lengths = [int(n) for n in mask.sum(1).tolist()]
            tokens += lengths
            for k in range(1, L):
                hidden, _ = model.run(hidden, mask, k - 1, k, exits=[])
                probs = {}
                for enc in encodings:
                    items = []
                    for i, n in enumerate(lengths):
                        data = offload_message(f"imdb-{start + i}", hidden[i, :n].numpy(), enc, k, L)
                        sizes[enc].append(len(data))
                        items.append(received(data, model, max_len))
                    tensor_sizes[enc].append(sum(_tensor_bytes(h.shape[1], model.hidden_size, enc) for h, _ in items))
                    if enc == "i8":
                        from stream import messages
                        for i, n in enumerate(lengths):
                            q, _ = messages.quantize_i8(hidden[i, :n].numpy())
                            zlib_i8.append(len(zlib.compress(q.tobytes(), 6)) / q.nbytes)
                    h, m = model.collate(items)
                    probs[enc] = model.run(h, m, k, L, exits="each")[1]
                if with_f32:
                    probs["f32"] = model.run(hidden, mask, k, L, exits="each")[1]
                ref = probs["f16"]
                for enc in worst:
                    diff = max(float((probs[enc][j] - ref[j]).abs().max()) for j in ref)
                    worst[enc][k] = max(worst[enc][k], diff)
                    flips[enc][k] += int((probs[enc][L].argmax(-1) != ref[L].argmax(-1)).sum())
                    changed = torch.stack([probs[enc][j].argmax(-1) != ref[j].argmax(-1) for j in ref]).any(0)
                    any_exit_flips[enc][k] += int(changed.sum())
    n = len(texts)
    mean = {e: float(np.mean(v)) for e, v in sizes.items()}
    out = {"samples": n, "offloads_per_encoding": n * (L - 1), "mean_tokens": round(float(np.mean(tokens)), 2),
           "bytes_per_offload": {e: round(v, 1) for e, v in mean.items()},
           "tensor_bytes_per_offload": {e: round(float(np.sum(v)) / (n * (L - 1)), 1) for e, v in tensor_sizes.items()},
           "zlib_i8_ratio": round(float(np.mean(zlib_i8)), 4) if zlib_i8 else None, "vs": {}}
    for enc in worst:
        total = sum(flips[enc].values())
        out["vs"][enc] = {"flip_rate": total / (n * (L - 1)), "flips": total,
                          "flips_by_resume_layer": flips[enc],
                          "any_exit_flips_by_resume_layer": any_exit_flips[enc],
                          "max_abs_prob_diff": max(worst[enc].values()),
                          "max_abs_prob_diff_by_resume_layer": {k: round(v, 6) for k, v in worst[enc].items()}}
    return out


def _tensor_bytes(tokens: int, hidden_size: int, encoding: str) -> int:
    from stream.messages import hidden_payload_bytes
    return hidden_payload_bytes(tokens, hidden_size, encoding)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench offload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: the default model)")
    parser.add_argument("--dataset", default="imdb", help="dataset (test split by default)")
    parser.add_argument("--samples", type=int, default=2000, help="samples of the shuffled stream")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per input")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--with-f32", action="store_true", help="also compare both encodings with float32")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, dest="json_out", default=Path("artifacts/bench_offload.json"),
                        help="JSON results")
    args = parser.parse_args(argv)

    import torch

    from stream import datasets
    from stream.config import default_model_dir
    from stream.model import MultiExitModel

    torch.set_num_threads(args.threads)
    path = args.model or default_model_dir()
    model = MultiExitModel.load(path)
    texts = datasets.shuffle_limit(datasets.load(args.dataset), shuffle=True, seed=args.seed, limit=args.samples).texts
    started = time.time()
    r = measure(model, texts, args.max_len, args.batch_size, ("f16", "i8"), args.with_f32, not args.no_progress)
    elapsed = time.time() - started
    i8 = r["vs"]["i8"]
    ratio = r["bytes_per_offload"]["i8"] / r["bytes_per_offload"]["f16"]
    L = model.num_layers

    print(f"model: {path}; {r['samples']} {args.dataset} samples (shuffled, seed {args.seed}), max_len {args.max_len}, "
          f"mean {r['mean_tokens']} tokens; {r['offloads_per_encoding']} offloads per encoding (splits 1..{L - 1}); "
          f"{elapsed:.0f} s")
    print(f"bytes per offload message: f16 {r['bytes_per_offload']['f16']:.0f}, i8 {r['bytes_per_offload']['i8']:.0f} "
          f"-> ratio {ratio:.4f} (target <= {BYTES_TARGET}); zlib on the int8 values would keep "
          f"{r['zlib_i8_ratio']:.1%} of them")
    print(f"{'vs f16':>8} {'split':>5} {'flips':>6} {'any-exit flips':>15} {'max |dp|':>10}")
    for enc, v in r["vs"].items():
        for k in range(1, L):
            print(f"{enc:>8} {k:>5} {v['flips_by_resume_layer'][k]:>6} {v['any_exit_flips_by_resume_layer'][k]:>15} "
                  f"{v['max_abs_prob_diff_by_resume_layer'][k]:>10.6f}")
    print(f"i8 vs f16: {i8['flips']} final-exit flips in {r['offloads_per_encoding']} offloads = flip rate "
          f"{i8['flip_rate']:.4%} (target <= {FLIP_TARGET:.1%}); largest exit-probability change "
          f"{i8['max_abs_prob_diff']:.6f}")
    result = {"bench": "offload", "model": str(path), "dataset": f"{args.dataset} (shuffled, seed {args.seed})",
              "max_len": args.max_len, "batch_size": args.batch_size, "threads": args.threads,
              "num_layers": L, "reference": "f16", "torch": torch.__version__, "machine": platform.machine(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1),
              "bytes_ratio": ratio, "flip_rate": i8["flip_rate"], "max_abs_prob_diff": i8["max_abs_prob_diff"],
              "flips_by_resume_layer": i8["flips_by_resume_layer"],
              "targets": {"bytes_ratio": BYTES_TARGET, "flip_rate": FLIP_TARGET},
              "meets_targets": ratio <= BYTES_TARGET and i8["flip_rate"] <= FLIP_TARGET, **r}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0
