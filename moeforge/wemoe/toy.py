"""Tiny local CLIP models and generated image-classification tasks for WEMoE tests and demos (no network).

Each task draws its own kind of picture (coloured blobs, stripe directions, square positions), so the
fine-tuned experts differ and a router can tell the tasks' inputs apart, as with real vision benchmarks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

IMAGE_SIZE = 16


def _noise_bg(rng, size, low, high):
    level = rng.uniform(low, high)
    return np.clip(level + rng.normal(0, 0.08, (size, size, 3)), 0, 1)


def _colors(rng, label, size):
    img = _noise_bg(rng, size, 0.2, 0.6)
    color = np.full(3, 0.1)
    color[label] = 0.9
    s = rng.integers(5, 9)
    y, x = rng.integers(0, size - s + 1, 2)
    img[y:y + s, x:x + s] = np.clip(color + rng.normal(0, 0.05, 3), 0, 1)
    return img


def _stripes(rng, label, size):
    yy, xx = np.mgrid[0:size, 0:size]
    coord = (yy, xx, yy + xx)[label]
    period = rng.integers(3, 6)
    on = ((coord + rng.integers(0, period)) % period) < period / 2
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = np.where(on[..., None], a, b)
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)


def _quadrant(rng, label, size):
    img = _noise_bg(rng, size, 0.0, 0.25)
    half = size // 2
    s = rng.integers(3, half - 1)
    oy, ox = (label // 2) * half, (label % 2) * half
    y, x = oy + rng.integers(0, half - s + 1), ox + rng.integers(0, half - s + 1)
    img[y:y + s, x:x + s] = rng.uniform(0.8, 1.0)
    return img


TASKS: Dict[str, Tuple[List[str], Callable]] = {
    "colors": (["red", "green", "blue"], _colors),
    "stripes": (["horizontal", "vertical", "diagonal"], _stripes),
    "quadrant": (["top left", "top right", "bottom left", "bottom right"], _quadrant),
}
TEMPLATES = ["a photo of {}.", "an image showing {}."]


def make_images(task: str, n: int, seed: int, size: int = IMAGE_SIZE) -> List[Tuple[np.ndarray, int]]:
    """n (uint8 HxWx3 image, label) pairs with balanced labels."""
    classes, draw = TASKS[task]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % len(classes)
        out.append(((draw(rng, label, size) * 255).round().astype(np.uint8), label))
    return out


def write_image_folder(out_dir: Path, task: str, images) -> Path:
    """The ImageFolder layout `moeforge wemoe` reads: one subfolder per class name."""
    from PIL import Image

    classes = TASKS[task][0]
    out_dir = Path(out_dir)
    for i, (img, label) in enumerate(images):
        sub = out_dir / classes[label]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:05d}.png")
    return out_dir


def make_clip(out_dir: Path, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64,
              num_layers: int = 2, image_size: int = IMAGE_SIZE, patch_size: int = 4, num_heads: int = 0):
    """A random-init CLIPModel with a byte-level BPE tokenizer and a CLIP image processor, saved to out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = [t.format(c) for classes, _ in TASKS.values() for c in classes for t in TEMPLATES]
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    heads = num_heads or max(1, hidden_size // 16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=heads, max_position_embeddings=32,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=fast.pad_token_id),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(out_dir))
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out_dir))
    return model


def _pixels(processor, images):
    from PIL import Image

    return processor(images=[Image.fromarray(img) for img, _ in images], return_tensors="pt")["pixel_values"]


def _train_vision(model, base_dir: Path, tasks: Sequence[str], steps: int, lr: float, n_train: int, seed: int,
                  batch_size: int, other_lr_scale: float = 1.0, rename=None) -> float:
    """Train the vision tower against frozen zero-shot heads on labelled images of `tasks` (cycled per step)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from moeforge.wemoe.families import zero_shot_head

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    processor = AutoImageProcessor.from_pretrained(str(base_dir))
    sets = []
    for k, task in enumerate(tasks):
        data = make_images(task, n_train, seed=1000 + 17 * seed + k)
        names = [rename(c) if rename else c for c in TASKS[task][0]]
        sets.append((zero_shot_head(model, tokenizer, names, TEMPLATES), _pixels(processor, data),
                     torch.tensor([lab for _, lab in data])))
    mlp = [p for n, p in model.vision_model.named_parameters() if ".mlp." in n]
    rest = [p for n, p in model.vision_model.named_parameters() if ".mlp." not in n]
    opt = torch.optim.Adam([{"params": mlp, "lr": lr}, {"params": rest, "lr": lr * other_lr_scale}])
    gen = torch.Generator().manual_seed(seed)
    scale = model.logit_scale.exp().detach()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        head, pixels, labels = sets[step % len(sets)]
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        emb = model.get_image_features(pixel_values=pixels[idx]).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(scale * emb @ head.T, labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def pretrain(base_dir: Path, steps: int, lr: float = 1e-3, seed: int = 0, n_train: int = 96, batch_size: int = 32) -> float:
    """Stand-in for CLIP pre-training: a little multi-task training of the vision tower, in place."""
    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(base_dir), dtype=torch.float32)
    # Under other class names ("pre red"): the features become useful, the zero-shot heads only partly so.
    loss = _train_vision(model, base_dir, list(TASKS), steps, lr, n_train, seed + 500, batch_size,
                         rename=lambda c: "pre " + c)
    model.save_pretrained(str(base_dir))
    return loss


def finetune(base_dir: Path, out_dir: Path, task: str, steps: int = 60, lr: float = 2e-3, n_train: int = 192,
             seed: int = 0, vision_only: bool = True, batch_size: int = 32, other_lr_scale: float = 0.1) -> float:
    """Fine-tune the vision tower on labelled images of `task` against its frozen zero-shot head (as the
    task-arithmetic checkpoints were made) and save it; returns the final training loss. Weights outside
    the MLPs learn at `other_lr_scale` times the rate, so task knowledge sits mostly in the MLPs, as the
    WEMoE paper finds for CLIP (with equal rates this tiny model keeps too much of it in attention)."""
    import torch
    from transformers import CLIPModel, CLIPVisionModel

    model = CLIPModel.from_pretrained(str(base_dir), dtype=torch.float32)
    loss = _train_vision(model, base_dir, [task], steps, lr, n_train, seed, batch_size, other_lr_scale)
    out_dir = Path(out_dir)
    if vision_only:
        vision = CLIPVisionModel(model.config.vision_config)
        vision.load_state_dict(model.vision_model.state_dict())  # transformers 5: CLIPModel.vision_model is one
        vision.save_pretrained(str(out_dir))
    else:
        model.save_pretrained(str(out_dir))
    return loss


def make_clip_tasks(root: Path, tasks: Sequence[str] = ("colors", "quadrant"), n_test: int = 96,
                    intermediate_size: int = 128, pretrain_steps: int = 150, finetune_steps: int = 150,
                    lr: float = 2e-3) -> dict:
    """A base CLIP, one fine-tuned expert per task (alternately saved as CLIPVisionModel and CLIPModel) and
    each task's labelled test images as an image folder; returns a `moeforge wemoe` config dict."""
    root = Path(root)
    make_clip(root / "base", seed=0, intermediate_size=intermediate_size)
    pretrain(root / "base", pretrain_steps, lr=lr)
    experts = []
    for i, task in enumerate(tasks):
        finetune(root / "base", root / task, task, steps=finetune_steps, lr=lr, seed=i, vision_only=i % 2 == 0)
        data = write_image_folder(root / "data" / task, task, make_images(task, n_test, seed=50 + i))
        experts.append({"name": task, "source_model": str(root / task), "data": str(data),
                        "classes": TASKS[task][0]})
    return {"family": "clip-vision", "base_model": str(root / "base"), "templates": list(TEMPLATES),
            "experts": experts}
