import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lynx_zoo import PrefixLynx, VQADataModule
from lynx_zoo.data import IGNORE_INDEX, Sample


def batch_of(model, samples):
    return model.processor(samples)


def shapes_samples(n=2, size=32):
    questions = [
        ("what color is the circle?", "red"),
        ("how many shapes are there?", "three"),
        ("where is the blue square?", "top left"),
        ("what shape is the red object?", "triangle"),
    ]
    return [Sample(q, a, image=torch.randn(3, size, size), category="c") for q, a in questions[:n]]


@pytest.mark.parametrize("size", [32, 48])
def test_logits_cover_visual_prefix_and_text(make_tiny, size):
    model = make_tiny(vision={"image_size": size})
    batch = batch_of(model, shapes_samples(2, size))
    out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    assert out.logits.shape == (2, 4 + batch["input_ids"].shape[1], len(model.tokenizer))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "overrides, trainable_prefixes",
    [
        ({}, {"bridge.", "llm.model.layers.0.adapter.", "llm.model.layers.2.adapter.", "frame_position"}),
        ({"adapters": {"every": None}}, {"bridge.", "frame_position"}),
        (
            {"vision": {"trainable": True}, "llm": {"trainable": True}},
            {"bridge.", "vision.", "llm.", "frame_position"},
        ),
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(make_tiny, overrides, trainable_prefixes):
    model = make_tiny(**overrides)
    batch = batch_of(model, shapes_samples(2))
    model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss.backward()
    for name, param in model.named_parameters():
        expected = any(name.startswith(p) for p in trainable_prefixes)
        assert param.requires_grad == expected, name
        if name == "frame_position":  # videos only: an image batch leaves it out
            assert param.grad is None
        elif expected:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable == {n for n, p in model.named_parameters() if any(n.startswith(x) for x in trainable_prefixes)}


def test_loss_is_on_answer_tokens_only(make_tiny):
    model = make_tiny()
    tok = model.tokenizer
    prompt = [tok.bos_token_id] + tok("user : how many shapes are there ? bot :", add_special_tokens=False)["input_ids"]
    answer = tok(" two", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])
    images = torch.randn(1, 3, 32, 32)
    out = model(ids, torch.ones_like(ids), images, labels)
    # by hand: position t predicts token t+1; the 4 visual tokens come first
    logits = out.logits[0, 4 + len(prompt) - 1 : -1]
    expected = F.cross_entropy(logits, torch.tensor(answer))
    torch.testing.assert_close(out.loss, expected)
    # changing the prompt's labels to real tokens would change the loss: they really are ignored
    out_all = model(ids, torch.ones_like(ids), images, ids.clone())
    assert not torch.allclose(out_all.loss, out.loss)


def test_padding_does_not_change_a_samples_loss(make_tiny):
    model = make_tiny()
    short, long = shapes_samples(4)[0], shapes_samples(4)[3]
    long = Sample(long.instruction + " " + long.instruction, long.answer, image=long.image)
    alone = batch_of(model, [short])
    loss_alone = model(alone["input_ids"], alone["attention_mask"], alone["images"], alone["labels"]).loss
    padded = batch_of(model, [short, long])
    assert padded["attention_mask"][0].eq(0).any(), "the short sample must be padded"
    padded["labels"][1] = IGNORE_INDEX  # only the short sample counts
    loss_padded = model(padded["input_ids"], padded["attention_mask"], padded["images"], padded["labels"]).loss
    torch.testing.assert_close(loss_padded, loss_alone, rtol=1e-5, atol=1e-5)


def test_without_image_and_adapters_pt_equals_its_llm(make_tiny):
    model = make_tiny(adapters={"every": None})
    batch = batch_of(model, [Sample("how many shapes are there?", "two")])
    ours = model(batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(ours, model.llm(input_ids=batch["input_ids"]).logits)


def fit_tiny(make_tiny, shapes_root, tmp_path, steps):
    model = make_tiny(llm={"trainable": True})
    data = VQADataModule(str(shapes_root / "train.jsonl"), str(shapes_root / "val.jsonl"), batch_size=16, num_workers=0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, data)
    return model, data, trainer


@pytest.mark.slow
def test_tiny_model_learns_and_reloads_identically(make_tiny, shapes_root, tmp_path):
    torch.manual_seed(0)
    model, data, trainer = fit_tiny(make_tiny, shapes_root, tmp_path, steps=40)
    batch = next(iter(data.val_dataloader()))
    # the loss on a fixed batch falls well below its value at initialisation
    fresh = make_tiny(llm={"trainable": True})
    with torch.no_grad():
        before = fresh(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss
        after = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss
    assert after < 0.6 * before, (before, after)
    assert "val/acc/colour" in trainer.callback_metrics

    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    reloaded = PrefixLynx.load_from_checkpoint(path)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], batch["images"]).logits
        b = reloaded(batch["input_ids"], batch["attention_mask"], batch["images"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert reloaded.generate(batch["images"][:3], batch["instructions"][:3]) == model.generate(
        batch["images"][:3], batch["instructions"][:3]
    )


@pytest.mark.slow
def test_generate_greedy_beam_and_sampling(make_tiny):
    model = make_tiny()
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200))]
    prompts = ["what color is the circle?", "how many shapes are there?"]
    greedy = model.generate(images, prompts, max_new_tokens=3)
    assert len(greedy) == 2 and all(isinstance(a, str) for a in greedy)
    assert model.generate(images, prompts, max_new_tokens=3, num_beams=1) == greedy
    assert len(model.generate(images, prompts, max_new_tokens=3, num_beams=3)) == 2
    torch.manual_seed(0)
    assert len(model.generate(images, prompts, max_new_tokens=3, do_sample=True, top_k=5)) == 2
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        model.generate(images[:1], prompts)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["PrefixLynx", "CrossAttnLynx"])
def test_bf16_frozen_llm_with_fp32_trainable_parts(make_tiny, fusion):
    import lynx_zoo

    model = make_tiny(getattr(lynx_zoo, fusion), llm={"dtype": "bfloat16"})
    assert model.llm.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    trainable = dict(model.trainable_parameters())
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    if fusion == "CrossAttnLynx":
        for block in model.fusion_blocks().values():
            block.attn_gate.data.fill_(0.5)
    batch = batch_of(model, shapes_samples(2))
    out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    reached = {n: p for n, p in trainable.items() if n != "frame_position"}  # videos only
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in reached.values())


@pytest.mark.parametrize("fusion", ["PrefixLynx", "CrossAttnLynx"])
def test_cached_generation_agrees_with_the_forward_pass_on_a_padded_batch(make_tiny, fusion):
    import lynx_zoo

    model = make_tiny(getattr(lynx_zoo, fusion), llm={"trainable": True}).eval()
    if fusion == "CrossAttnLynx":
        for block in model.fusion_blocks().values():
            block.attn_gate.data.fill_(0.7)
    prompts = ["what color is the circle?", "how many shapes are there in the top left?"]
    images = torch.randn(2, 3, 32, 32)
    batch = model.processor.prompts([Sample(p) for p in prompts])
    assert batch["attention_mask"][0].eq(0).any()  # the first prompt is left-padded
    generated = model.generate_ids(
        batch["input_ids"], batch["attention_mask"], images, max_new_tokens=3, do_sample=False
    )
    # greedy decoding with the KV cache == argmax of the uncached forward over the growing sequence
    ids, mask = batch["input_ids"], batch["attention_mask"]
    finished = torch.zeros(2, dtype=torch.bool)  # rows that produced EOS are padded afterwards
    for step in range(generated.shape[1]):
        with torch.no_grad():
            next_token = model(ids, mask, images).logits[:, -1].argmax(-1)
        assert torch.equal(next_token[~finished], generated[~finished, step]), step
        finished |= generated[:, step] == model.tokenizer.eos_token_id
        ids = torch.cat([ids, generated[:, step : step + 1]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_frozen_llm_stays_in_eval_mode_through_train_and_generate(make_tiny):
    model = make_tiny()
    model.train()
    assert model.training and model.bridge.training and not model.llm.training
    model.generate(torch.randn(1, 3, 32, 32), ["how many shapes are there?"], max_new_tokens=1)
    assert model.training and not model.llm.training and not model.vision.model.training
    assert make_tiny(llm={"trainable": True}).train().llm.training
