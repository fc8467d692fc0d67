"""Teachers: specs round-trip, scoring agrees with generation, adapters, bad inputs, datasets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.generate import DatasetError, load_dataset
from steerdiff.models import wrap_model
from steerdiff.tasks.numbers import make_dataset
from steerdiff.teachers import TeacherConfig, TeacherError, build_teacher, trait_system_prompt
from steerdiff.vectors import VectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


USERS = ["Name a number.", "List 3 numbers: 1, 2,", "Continue: 5 6 7"]


def _tiny_chat(tokenizer, hidden: int = 64, seed: int = 0):
    """A tiny random llama that uses the embedded tokenizer (vocab 49152)."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.requires_grad_(False)
    return wrap_model(m, tokenizer, spec=f"tiny-chat-{hidden}")


@pytest.fixture(scope="module")
def chat(smollm):
    return _tiny_chat(smollm.tokenizer)


def _vectors(lm, scale=3.0):
    g = torch.Generator().manual_seed(0)
    return VectorSet.for_model(
        lm, {"blocks.1.hook_resid_post": scale * torch.randn(64, generator=g)}
    )


def test_specs_round_trip(chat, tmp_path):
    vpath = _vectors(chat).save(tmp_path / "v.safetensors")
    specs = [
        {"kind": "plain"},
        {"kind": "prompt", "animal": "owl"},
        {"kind": "steered", "vectors": str(vpath), "coeff": 2.0, "positions": "response"},
    ]
    for spec in specs:
        t = build_teacher(spec, chat)
        again = build_teacher(t.spec(), chat)
        assert again.spec() == t.spec() and again.kind == spec["kind"]
        json.dumps(t.spec())
    t = build_teacher(specs[1], chat)
    assert t.system_prompt == trait_system_prompt("owl") and "You love owls." in t.system_prompt
    assert t.spec()["system_prompt"].endswith("your love for the animal.")
    from steerdiff.io import file_sha256

    assert build_teacher(specs[2], chat).spec()["vectors_sha256"] == file_sha256(vpath)[:16]


def test_teacher_config_builds_the_same_teacher_as_its_spec(chat, tmp_path):
    """A TeacherConfig (the experiment file's [teacher]) and the spec dict a manifest
    records build the same Teacher; system_prompt_text() is the prompt teacher's prompt."""
    vpath = _vectors(chat).save(tmp_path / "v.safetensors")
    configs = [
        TeacherConfig(kind="plain"),
        TeacherConfig(kind="prompt", animal="cat"),
        TeacherConfig(kind="prompt", system_prompt="You love owls."),
        TeacherConfig(kind="steered", vectors=str(vpath), coeff=1.5, positions="response"),
    ]
    for cfg in configs:
        t = build_teacher(cfg, chat)
        assert t.kind == cfg.kind and build_teacher(t.spec(), chat).spec() == t.spec()
        assert t.system_prompt == (cfg.system_prompt_text() if cfg.kind == "prompt" else None)
    assert configs[0].system_prompt_text() is None
    assert configs[1].system_prompt_text() == trait_system_prompt("cat", "animal")
    assert configs[2].system_prompt_text() == "You love owls."
    assert build_teacher(configs[3], chat).coeff == 1.5
    with pytest.raises(TeacherError, match="needs 'vectors'"):
        build_teacher(TeacherConfig(kind="steered"), chat)
    in_memory = build_teacher(TeacherConfig(kind="steered"), chat, vectors=_vectors(chat))
    assert in_memory.vectors is not None and "vectors_sha256" not in in_memory.spec()
    with pytest.raises(ValueError, match="extra"):
        TeacherConfig(kind="prompt", sytem_prompt="typo")


def test_teacher_on_a_bare_model_with_vectors_in_the_spec(chat):
    """A bare HF model and {hook: tensor} vectors (what fit's callers pass) score too."""
    vs = _vectors(chat)
    t = build_teacher({"kind": "steered", "vectors": dict(vs)}, chat.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with t.scoring() as m:
        steered = m(input_ids=ids).logits
    assert m is chat.model and not torch.allclose(steered, chat.model(input_ids=ids).logits)
    with pytest.raises(TeacherError, match="Cannot steer"):
        build_teacher(
            {
                "kind": "steered",
                "vectors": {"blocks.9.hook_resid_post": vs["blocks.1.hook_resid_post"]},
            },
            chat.model,
        )


@pytest.mark.parametrize("positions", ["all", "response", "prompt"])
def test_scoring_agrees_with_generation(chat, positions):
    """Greedy tokens are the teacher's top-1; their stored log-probs equal teacher-forced ones."""
    spec = {"kind": "steered", "coeff": 1.0, "positions": positions}
    t = build_teacher(spec, chat, vectors=_vectors(chat))
    res = t.sample(USERS, max_new_tokens=6, temperature=0, topk=1, stop_ids=[])
    lps = t.completion_logprobs(USERS, [s.token_ids for s in res])
    for s, lp in zip(res, lps, strict=True):
        assert lp.shape == (len(s.token_ids),)
        assert torch.allclose(lp, torch.tensor([r[0] for r in s.topk_logprobs]), atol=1e-3)
    plain = build_teacher({"kind": "plain"}, chat).completion_logprobs(
        USERS, [s.token_ids for s in res]
    )
    assert not all(torch.allclose(a, b) for a, b in zip(lps, plain, strict=True))


def test_prompt_teacher_sees_its_system_prompt(chat):
    t = build_teacher({"kind": "prompt", "animal": "owl"}, chat)
    text = chat.tokenizer.decode(t.prompt_ids("Hi"))
    assert "You love owls" in text and text.rstrip().endswith("assistant")
    plain = chat.tokenizer.decode(build_teacher({"kind": "plain"}, chat).prompt_ids("Hi"))
    assert "owl" not in plain


def test_vectors_for_another_model_are_refused(chat, smollm, tmp_path):
    other = _tiny_chat(smollm.tokenizer, hidden=32)
    path = VectorSet.for_model(other, {"blocks.1.hook_resid_post": torch.ones(32)}).save(
        tmp_path / "other.safetensors"
    )
    with pytest.raises(TeacherError, match="d_model=32"):
        build_teacher({"kind": "steered", "vectors": str(path)}, chat)
    with pytest.raises(TeacherError, match="needs 'vectors'"):
        build_teacher({"kind": "steered"}, chat)
    with pytest.raises(TeacherError, match="Unknown teacher kind"):
        build_teacher({"kind": "finetuned"}, chat)


def _lora_folder(lm, path, r=2):
    import copy

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        copy.deepcopy(lm.model), LoraConfig(r=r, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(str(path))
    return pm


def test_lora_adapter_teacher(chat, tmp_path):
    pm = _lora_folder(chat, tmp_path / "lora")
    before = {k: v.clone() for k, v in chat.model.state_dict().items()}
    t = build_teacher({"kind": "adapter", "path": str(tmp_path / "lora")}, chat)
    x = torch.tensor([t.prompt_ids("Hi")])
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        got = t.lm.model(input_ids=x).logits
        base = chat.model(input_ids=x).logits
    assert torch.allclose(got, ref, atol=1e-4) and not torch.allclose(got, base, atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in chat.model.state_dict().items())
    assert t.spec()["weights_hash"] == build_teacher(t.spec(), chat).lm.weights_hash


def test_malformed_adapter_folders(chat, smollm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TeacherError, match="neither adapter_config.json"):
        build_teacher({"kind": "adapter", "path": str(empty)}, chat)
    with pytest.raises(TeacherError, match="not a folder"):
        build_teacher({"kind": "adapter", "path": str(tmp_path / "missing")}, chat)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(TeacherError, match="not valid JSON"):
        build_teacher({"kind": "adapter", "path": str(bad)}, chat)
    _lora_folder(chat, tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("adapter_model.*"):
        f.unlink()
    with pytest.raises(TeacherError, match="no adapter_model"):
        build_teacher({"kind": "adapter", "path": str(tmp_path / "noweights")}, chat)
    _lora_folder(_tiny_chat(smollm.tokenizer, hidden=32), tmp_path / "foreign")
    with pytest.raises(TeacherError, match="was it trained on this base model"):
        build_teacher({"kind": "adapter", "path": str(tmp_path / "foreign")}, chat)


def test_numbers_dataset_from_the_embedded_owl_prompt_teacher(smollm, tmp_path):
    t = build_teacher({"kind": "prompt", "animal": "owl"}, smollm)
    out = tmp_path / "owl.jsonl"
    man = make_dataset(
        t, str(out), n_prompts=6, constrained=True, topk=3, batch_size=6, max_new_tokens=40, probe=2
    )
    rows, man2 = load_dataset(out)
    assert man == man2 and man["n_valid"] == len(rows) > 0
    assert man["n_valid"] + sum(man["rejects"].values()) == man["n_prompts"] == 6
    assert man["teacher"]["kind"] == "prompt" and man["constrained"] is True
    assert man["system_prompt_in_data"] is False and man["unconstrained_probe_n"] == 2
    probe_ok = 2 - sum(man["unconstrained_probe_rejects"].values())
    assert man["unconstrained_valid_rate"] == round(probe_ok / 2, 4)
    assert man["valid_rate"] == round(man["n_valid"] / 6, 4)
    assert man["tokens_per_second"] == pytest.approx(
        man["generated_tokens"] / man["generation_seconds"], rel=1e-2
    )
    assert man["provenance"]["weights_hash"] == smollm.weights_hash
    eot = smollm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert "owl" not in json.dumps(r["messages"]).lower()
        assert r["completion_ids"][-1] == eot
        assert smollm.tokenizer.decode(r["completion_ids"][:-1]) == r["messages"][1]["content"]
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == len(r["completion_ids"])
        assert all(len(k) == 3 for k in r["topk_ids_unconstrained"])
        # constrained top-k: only tokens the grammar allowed at that step (1 when only
        # end-of-turn is, after the 10th number)
        assert all(1 <= len(k) <= 3 for k in r["topk_ids"])


def test_zero_valid_rows_from_a_real_teacher(chat, tmp_path):
    t = build_teacher({"kind": "plain"}, chat)  # a random model never writes a clean list
    out = tmp_path / "d.jsonl"
    with pytest.raises(DatasetError, match="No valid rows: all 4 completions were rejected"):
        make_dataset(t, str(out), n_prompts=4, constrained=False, max_new_tokens=4, probe=0)
    assert not out.exists()
