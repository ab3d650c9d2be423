#!/usr/bin/env python3
"""The diffusers side of `cargo xtask bench --reference diffusers`.

Builds an InstructPix2Pix pipeline of a built-in architecture with seeded random weights (or
loads a diffusers folder; `--save DIR` writes the built one as a diffusers folder, so that ip2p
loads the same weights), runs the paths of one cell group (full-cycle, latent-in,
latent-only) with the same resolution, batch, steps, warm-up and repeats as ip2p, and prints
one JSON line: per path the median wall time, per-stage medians and the process's peak RSS
over the measured runs (Linux VmHWM, reset before each path through /proc/self/clear_refs;
tracemalloc does not see torch's allocations).

The stages are those of diffusers' StableDiffusionInstructPix2PixPipeline.__call__ (prompt
encoding with the empty negative prompt, VAE encode mode(), Euler-ancestral denoising with
3-way guidance, VAE decode), unrolled so each can be timed. Needs no fixtures beyond the
repository's configs and CLIP vocabulary, and no network.

Install: python3 -m venv ~/.cache/ip2p/venv && ~/.cache/ip2p/venv/bin/pip install torch
diffusers transformers (CPU wheels: --index-url https://download.pytorch.org/whl/cpu for torch).
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768,
)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def strip(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build(args, torch):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sched_cfg = read_json(os.path.join(ROOT, "fixtures/models/tiny/scheduler/scheduler_config.json"))
    if args.model:
        d = args.model
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
        text = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
        tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
        sched_cfg = read_json(os.path.join(d, "scheduler/scheduler_config.json"))
    elif args.preset == "sd15":
        torch.manual_seed(0)
        unet_cfg = strip(read_json(os.path.join(ROOT, "crates/ip2p-unet/src/sd15_ip2p_unet_config.json")))
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        bpe = os.path.join(ROOT, "fixtures/clip-bpe")
        tok = CLIPTokenizer(os.path.join(bpe, "vocab.json"), os.path.join(bpe, "merges.txt"),
                            model_max_length=77)
    elif args.preset == "tiny":
        torch.manual_seed(0)
        tiny = os.path.join(ROOT, "fixtures/models/tiny")
        unet = UNet2DConditionModel(**strip(read_json(os.path.join(tiny, "unet/config.json"))))
        vae = AutoencoderKL(**strip(read_json(os.path.join(tiny, "vae/config.json"))))
        tcfg = {k: v for k, v in read_json(os.path.join(tiny, "text_encoder/config.json")).items()
                if k not in ("architectures", "dtype", "transformers_version", "model_type")}
        text = CLIPTextModel(CLIPTextConfig(**tcfg))
        tok = CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer"))
    else:
        sys.exit(f"unknown preset {args.preset}")
    sched = EulerAncestralDiscreteScheduler.from_config(sched_cfg)
    dtype = dict(f32=torch.float32, f16=torch.float16, bf16=torch.bfloat16)[args.dtype]
    for m in (unet, vae, text):
        m.eval().to(torch.float32)
    if args.device != "cpu" or dtype != torch.float32:
        # As diffusers' GPU users run it: UNet and text encoder in `dtype`, the VAE too unless
        # f32 (the pipeline's own default; ip2p keeps its VAE in f32 in every dtype).
        unet.to(args.device, dtype)
        text.to(args.device, dtype)
        vae.to(args.device, dtype)
    return unet, vae, text, tok, sched


def save(args, parts):
    """Write `parts` as a diffusers InstructPix2Pix folder at args.save, for ip2p to load the same
    weights. Written aside and renamed, so a complete folder is the only kind that exists."""
    import shutil
    from diffusers import StableDiffusionInstructPix2PixPipeline

    unet, vae, text, tok, sched = parts
    tmp = args.save + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(args.save, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
    os.rename(tmp, args.save)
    print(json.dumps(dict(saved=args.save)))


def reset_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_once(torch, parts, path, inp, prompts, steps, seed, gs=7.5, igs=1.5):
    unet, vae, text, tok, sched = parts
    st = {}
    device, dtype = unet.device, unet.dtype
    # A GPU runs asynchronously: a stage's time ends when its kernels have finished.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        sync()
        st[name] = st.get(name, 0.0) + time.perf_counter() - t
        return out

    def encode_text():
        def enc(texts):
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            return text(ids.to(device))[0]
        p = enc(prompts)
        n = enc([""] * len(prompts))
        return torch.cat([p, n, n])

    start = time.perf_counter()
    emb = timed("text_s", encode_text)
    if path == "full-cycle":
        img_lat = timed("vae_encode_s", lambda: vae.encode(inp).latent_dist.mode())
    else:
        img_lat = inp
    img_cat = torch.cat([img_lat, img_lat, torch.zeros_like(img_lat)])
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    lat = (torch.randn(img_lat.shape, generator=g) * sched.init_noise_sigma).to(device, dtype)
    step_s = []
    for t in sched.timesteps:
        t0 = time.perf_counter()
        x = torch.cat([lat] * 3)
        x = sched.scale_model_input(x, t)
        x = torch.cat([x, img_cat], dim=1)
        eps = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        et, ei, eu = eps.chunk(3)
        eps = eu + gs * (et - ei) + igs * (ei - eu)
        lat = sched.step(eps, t, lat, generator=g, return_dict=False)[0]
        sync()
        step_s.append(time.perf_counter() - t0)
    st["denoise_s"] = sum(step_s)
    if path != "latent-only":
        timed("vae_decode_s", lambda: vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0])
    st["total_s"] = time.perf_counter() - start
    st["step_s"] = step_s
    return st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--model")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--paths", default="full-cycle,latent-in,latent-only")
    ap.add_argument("--save", help="save the preset's random weights as a diffusers folder here, and exit")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (what the bench compares with), cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    args = ap.parse_args()

    import torch
    import diffusers
    import transformers

    torch.set_grad_enabled(False)
    parts = build(args, torch)
    if args.save:
        save(args, parts)
        return
    vae = parts[1]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    b, h, w = args.batch, args.height, args.width
    lat_ch = vae.config.latent_channels
    g = torch.Generator().manual_seed(1)
    image = torch.rand((b, 3, h, w), generator=g) * 2 - 1
    latents = torch.randn((b, lat_ch, h // f, w // f), generator=g)
    prompts = [f"turn the sky into a starry night, variant {i}" for i in range(b)]

    cells = []
    for path in args.paths.split(","):
        inp = (image if path == "full-cycle" else latents).to(parts[0].device, parts[0].dtype)
        runs = args.warmup + max(args.repeats, 1)
        first_measured = min(args.warmup, runs - 1)
        can_reset = reset_rss()
        results = []
        for r in range(runs):
            if r == first_measured and can_reset:
                reset_rss()
            results.append(run_once(torch, parts, path, inp, prompts, args.steps, r))
        measured = results[first_measured:]
        med = lambda k: statistics.median(m[k] for m in measured) if k in measured[0] else None
        cells.append(dict(
            path=path,
            total_s=med("total_s"),
            first_run_s=results[0]["total_s"],
            text_s=med("text_s"),
            vae_encode_s=med("vae_encode_s"),
            denoise_s=med("denoise_s"),
            step_s=[statistics.median(m["step_s"][i] for m in measured) for i in range(len(measured[0]["step_s"]))],
            vae_decode_s=med("vae_decode_s"),
            peak_rss_bytes=rss_peak() if can_reset else None,
        ))
    print(json.dumps(dict(
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                      transformers=transformers.__version__, threads=torch.get_num_threads(),
                      device=(torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
                      dtype=args.dtype),
        cells=cells,
    )))


if __name__ == "__main__":
    main()
