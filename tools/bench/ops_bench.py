#!/usr/bin/env python3
"""The PyTorch column of `cargo xtask bench --ops`: times single layer ops at the shapes the
Rust side defines (xtask/src/ops.rs) and prints the timings as one JSON line.

Input (a file given by --shapes, or stdin when it is "-"): a JSON object
  {"threads": 2, "warmup": 1, "repeats": 5, "seed": 0,
   "ops": [{"id": 0, "op": "conv2d", "batch": 3, ...}, ...]}
or a bare list of ops (then --threads/--warmup/--repeats or their defaults apply). The op
fields are those of the Rust `Op` enum (serde, tagged by "op"):

  conv2d      batch in_channels out_channels height width kernel padding residual
              F.conv2d with bias, then + residual
  group_norm  batch channels height width groups eps silu     F.group_norm, then F.silu
  layer_norm  batch tokens dim eps                              F.layer_norm
  linear      batch tokens in_features out_features bias residual
              F.linear, then + residual
  geglu       batch tokens in_features inner
              diffusers' GEGLU: F.linear to 2·inner, chunk(2, -1), hidden · F.gelu(gate)
  attention   batch heads q_len kv_len head_dim
              diffusers' AttnProcessor2_0 on [b, l, heads·head_dim] projections: view and
              transpose to [b, h, l, d], F.scaled_dot_product_attention, transpose back, reshape

Each op runs under torch.inference_mode() in float32 on torch.set_num_threads(threads); inputs
and weights are random (torch.manual_seed(seed)). Output (stdout, one line):
  {"torch": "2.x", "threads": n, "results": [{"id": 0, "median_s": ..., "times_s": [...]}, ...]}
An op that fails gets {"id": ..., "error": "..."} instead of times.

Needs only torch (tools/fixtures/requirements.txt). Standalone:
  python tools/bench/ops_bench.py --shapes target/bench/ops_shapes.json
"""

import argparse
import json
import statistics
import sys
import time


def build(op, torch, F):
    """A zero-argument callable running `op` once on fresh random inputs."""
    kind = op["op"]
    randn = torch.randn
    if kind == "conv2d":
        b, cin, cout = op["batch"], op["in_channels"], op["out_channels"]
        h, w, k, p = op["height"], op["width"], op["kernel"], op["padding"]
        x = randn(b, cin, h, w)
        weight = randn(cout, cin, k, k) * (cin * k * k) ** -0.5
        bias = randn(cout)
        oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
        r = randn(b, cout, oh, ow) if op["residual"] else None

        def run():
            y = F.conv2d(x, weight, bias, padding=p)
            return y if r is None else r + y

        return run
    if kind == "group_norm":
        b, c, h, w = op["batch"], op["channels"], op["height"], op["width"]
        groups, eps, silu = op["groups"], op["eps"], op["silu"]
        x = randn(b, c, h, w)
        gamma, beta = randn(c), randn(c)

        def run():
            y = F.group_norm(x, groups, gamma, beta, eps)
            return F.silu(y) if silu else y

        return run
    if kind == "layer_norm":
        dim = op["dim"]
        x = randn(op["batch"], op["tokens"], dim)
        gamma, beta = randn(dim), randn(dim)
        return lambda: F.layer_norm(x, (dim,), gamma, beta, op["eps"])
    if kind == "linear":
        b, t, fi, fo = op["batch"], op["tokens"], op["in_features"], op["out_features"]
        x = randn(b, t, fi)
        weight = randn(fo, fi) * fi**-0.5
        bias = randn(fo) if op["bias"] else None
        r = randn(b, t, fo) if op["residual"] else None

        def run():
            y = F.linear(x, weight, bias)
            return y if r is None else y + r

        return run
    if kind == "geglu":
        b, t, fi, inner = op["batch"], op["tokens"], op["in_features"], op["inner"]
        x = randn(b, t, fi)
        weight = randn(2 * inner, fi) * fi**-0.5
        bias = randn(2 * inner)

        def run():
            hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
            return hidden * F.gelu(gate)

        return run
    if kind == "attention":
        b, h, lq, lk, d = op["batch"], op["heads"], op["q_len"], op["kv_len"], op["head_dim"]
        q, k, v = randn(b, lq, h * d), randn(b, lk, h * d), randn(b, lk, h * d)

        def run():
            qh = q.view(b, -1, h, d).transpose(1, 2)
            kh = k.view(b, -1, h, d).transpose(1, 2)
            vh = v.view(b, -1, h, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2).reshape(b, -1, h * d)

        return run
    raise ValueError(f"unknown op {kind!r}")


def time_op(run, warmup, repeats):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        y = run()
        times.append(time.perf_counter() - t)
        del y
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="-", help="JSON request file, '-' for stdin (default)")
    ap.add_argument("--threads", type=int, help="torch threads (default: the request's, else torch's)")
    ap.add_argument("--warmup", type=int, help="unmeasured runs per op (default: the request's, else 1)")
    ap.add_argument("--repeats", type=int, help="measured runs per op (default: the request's, else 5)")
    ap.add_argument("--seed", type=int, help="torch seed (default: the request's, else 0)")
    args = ap.parse_args()

    text = sys.stdin.read() if args.shapes == "-" else open(args.shapes).read()
    req = json.loads(text)
    if isinstance(req, list):
        req = {"ops": req}
    pick = lambda flag, key, default: flag if flag is not None else req.get(key, default)
    threads = pick(args.threads, "threads", None)
    warmup = pick(args.warmup, "warmup", 1)
    repeats = max(1, pick(args.repeats, "repeats", 5))
    seed = pick(args.seed, "seed", 0)

    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    results = []
    with torch.inference_mode():
        for i, op in enumerate(req["ops"]):
            ident = op.get("id", i)
            try:
                run = build(op, torch, F)
                times = time_op(run, warmup, repeats)
                results.append({"id": ident, "median_s": statistics.median(times), "times_s": times})
            except Exception as e:  # one failing op must not lose the others
                results.append({"id": ident, "error": f"{type(e).__name__}: {e}"})
            finally:
                run = None
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
