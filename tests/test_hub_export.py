"""Export -> load: identical outputs in a fresh process, only trainable weights stored, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_fixtures import fixed_inputs, make_model, outputs, write_bases
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.hub import BaseModelNotFoundError, VariantError, export_variant, load_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    return write_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.slow
def test_export_then_load_in_a_fresh_process_gives_identical_logits_and_generations(tmp_path, bases):
    model = make_model(bases)
    inputs = fixed_inputs()
    logits, answers = outputs(model, inputs)
    export_variant(model, tmp_path / "variant")
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from safetensors.torch import load_file, save_file
        sys.path.insert(0, {str(REPO / "tests")!r})
        from hub_fixtures import outputs
        import lynx_zoo
        model = lynx_zoo.load_pretrained({str(tmp_path / "variant")!r}, expected=lynx_zoo.PrefixLynx)
        logits, answers = outputs(model, load_file({str(tmp_path / "inputs.safetensors")!r}))
        save_file({{"logits": logits}}, {str(tmp_path / "out.safetensors")!r})
        print(json.dumps(answers))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], logits)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == answers


def test_exported_folder_holds_only_the_trainable_weights(tmp_path, bases):
    model = make_model(bases)
    folder = export_variant(model, tmp_path / "variant")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(trainable)
    assert any(k.startswith("bridge.") for k in keys) and any(".adapter." in k for k in keys)
    assert not any(k.startswith("vision.") or "embed_tokens" in k for k in keys)
    # the file is the header plus exactly those tensors (fp32)
    data_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    header = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert (folder / "model.safetensors").stat().st_size == 8 + header + data_bytes
    config = json.loads((folder / "config.json").read_text())
    assert config["model_class"] == "lynx_zoo.fusion.prefix.PrefixLynx"
    assert config["weights"]["num_parameters"] == sum(p.numel() for p in trainable.values())
    assert config["bases"]["llm"]["model"] == str(bases["llm"].model)
    assert len(config["bases"]["vision"]["checkpoint_sha256"]) == 64
    assert config["tokenizer"] is None and sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_the_added_embedding_row_is_rebuilt_from_the_base_not_stored(tmp_path, bases):
    model = make_model(bases)
    embeddings = model.llm.get_input_embeddings().weight
    base_rows = embeddings.shape[0] - 1
    torch.testing.assert_close(embeddings[-1], embeddings[:base_rows].mean(0), rtol=0, atol=0)
    loaded = load_pretrained(export_variant(model, tmp_path / "variant"))
    assert torch.equal(loaded.llm.get_input_embeddings().weight, embeddings)


@pytest.mark.slow
def test_random_weight_bases_are_stored_whole(tmp_path):
    model = make_model()  # tower and LLM built with random weights: not reproducible from any base
    folder = export_variant(model, tmp_path / "variant")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
    loaded = load_pretrained(folder)
    inputs = fixed_inputs()
    assert torch.equal(outputs(loaded, inputs)[0], outputs(model, inputs)[0])


def test_a_tampered_weight_file_is_refused(tmp_path, bases):
    folder = export_variant(make_model(bases), tmp_path / "variant")
    state = load_file(str(folder / "model.safetensors"))
    state["bridge.latents"] = state["bridge.latents"] + 1e-3
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(VariantError, match=r"model.safetensors: sha256 .* does not match"):
        load_pretrained(folder)


class _Exploit:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle was loaded"))


def test_a_pickle_named_like_a_weight_file_is_never_loaded(tmp_path, bases):
    model = make_model(bases)
    folder = export_variant(model, tmp_path / "variant")
    marker = tmp_path / "marker"
    for name in ("pytorch_model.bin", "model.pt"):
        (folder / name).write_bytes(pickle.dumps(_Exploit(marker)))
    inputs = fixed_inputs()
    assert torch.equal(outputs(load_pretrained(folder), inputs)[0], outputs(model, inputs)[0])
    assert not marker.exists()
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pickle files such as pytorch_model.bin are never loaded"):
        load_pretrained(folder)
    assert not marker.exists()


def test_a_ca_variant_where_pt_is_expected_says_which_and_what_to_do(tmp_path, bases):
    folder = export_variant(make_model(bases, cls=CrossAttnLynx), tmp_path / "ca")
    with pytest.raises(VariantError, match=r"CA \(cross-attention, CrossAttnLynx\).*expected=CrossAttnLynx"):
        load_pretrained(folder, expected=PrefixLynx)
    assert isinstance(load_pretrained(folder, expected=CrossAttnLynx), CrossAttnLynx)


def test_weights_of_the_wrong_shape_name_the_key_and_both_shapes(tmp_path, bases):
    folder = export_variant(make_model(bases), tmp_path / "variant")
    config = json.loads((folder / "config.json").read_text())
    config["init_args"]["bridge"]["num_queries"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VariantError, match=r"bridge.latents: expected \(8, 32\), got \(4, 32\)"):
        load_pretrained(folder)


def test_a_missing_base_names_it_and_the_way_out(tmp_path, bases):
    folder = export_variant(make_model(bases), tmp_path / "variant")
    llm_dir = Path(bases["llm"].model)
    moved = tmp_path / "moved_llm"
    llm_dir.rename(moved)
    try:
        with pytest.raises(BaseModelNotFoundError, match=f"base LLM folder {llm_dir} is missing.*overrides="):
            load_pretrained(folder)
        model = load_pretrained(folder, overrides={"llm": {"model": str(moved)}})
        assert isinstance(model, PrefixLynx)
    finally:
        moved.rename(llm_dir)


def test_remote_code_stays_off_unless_the_caller_turns_it_on(tmp_path):
    folder = export_variant(make_model(), tmp_path / "variant")
    config = json.loads((folder / "config.json").read_text())
    config["init_args"]["llm"]["trust_remote_code"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VariantError, match="pass trust_remote_code=True"):
        load_pretrained(folder)
    assert load_pretrained(folder, trust_remote_code=True).llm_config.trust_remote_code is True
