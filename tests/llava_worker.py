"""Run in a fresh interpreter without lynx_zoo: load an exported LLaVA folder with transformers alone, answer the
requests in ``requests.json`` and save logits and answers (tests/test_llava_export.py)."""

import json
import sys

sys.modules["mistral_common"] = None  # installed without its dependencies here (tokenizer file only): unusable

try:
    import lynx_zoo  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("lynx_zoo is importable: the worker must run without it")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

folder, requests, out = sys.argv[1:4]
spec = json.loads(open(requests).read())
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
# the PIL backend resizes as lynx_zoo's transform (torchvision on PIL images) does; the default (torchvision on
# tensors) rounds some resized pixels to the next grey level
processor = AutoProcessor.from_pretrained(folder, backend="pil")
default_processor = AutoProcessor.from_pretrained(folder)
texts = [
    processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
    )
    for q in spec["questions"]
]
images = [Image.open(p).convert("RGB") for p in spec["images"]]
batch = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
mask = batch["attention_mask"]
default_pixels = default_processor(text=texts, images=images, return_tensors="pt", padding=True)["pixel_values"]
with torch.no_grad():
    logits = model(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    ids = model.generate(**batch, max_new_tokens=spec["max_new_tokens"], do_sample=False)
answers = [a.strip() for a in processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]
outputs = {
    "logits": logits,
    "mask": mask,
    "pixel_values": batch["pixel_values"],
    "default_pixel_values": default_pixels,
}
torch.save({**outputs, "answers": answers, "texts": texts}, out)
