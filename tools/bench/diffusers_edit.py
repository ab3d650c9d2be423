"""One diffusers InstructPix2Pix edit as a whole process, for the README's loading table.

    /usr/bin/time -v python tools/bench/diffusers_edit.py MODEL_DIR IMAGE [STEPS [VARIANT]]

VARIANT (e.g. fp16) loads `*.fp16.safetensors` into float32, as `ip2p edit --variant fp16` does.

Prints the seconds of `import torch`, `from_pretrained` and the edit; /usr/bin/time gives the
process's wall time and peak RSS. Two threads, as the ip2p side on the development machine.
"""

import sys
import time

t0 = time.time()
import torch  # noqa: E402
from diffusers import StableDiffusionInstructPix2PixPipeline  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)
t1 = time.time()
variant = sys.argv[4] if len(sys.argv) > 4 else None
pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
    sys.argv[1],
    safety_checker=None,
    requires_safety_checker=False,
    variant=variant,
    torch_dtype=torch.float32,
)
t2 = time.time()
image = Image.open(sys.argv[2]).convert("RGB")
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1
pipe(
    "make it snowy",
    image=image,
    num_inference_steps=steps,
    generator=torch.Generator().manual_seed(0),
).images[0]
t3 = time.time()
print(f"import {t1 - t0:.2f} s, from_pretrained {t2 - t1:.2f} s, edit {t3 - t2:.2f} s")
