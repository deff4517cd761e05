"""Native MiniCPM: architecture (via the exact Llama folding), loading official-layout folders,
attention backends, padding, packing, the chunked loss, and LoRA training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from conftest import TINY_CONFIGS, VOCAB, random_ids, random_minicpm
from transformers.loss.loss_utils import ForCausalLMLoss

import minicpm_finetune  # noqa: F401  registers model_type "minicpm"
from minicpm_finetune.models.configuration_minicpm import MiniCPMConfig
from minicpm_finetune.export import fold_into_llama
from minicpm_finetune.models.families import family_of
from minicpm_finetune.models.loss import causal_lm_loss
from minicpm_finetune.models.modeling_minicpm import MiniCPMForCausalLM
from minicpm_finetune.tiny import tiny_config


def greedy(model, input_ids, **kwargs):
    return model.generate(
        input_ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0, **kwargs
    )


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("tied", [True, False])
def test_llama_folding_gives_same_logits_and_generation(tied):
    model = random_minicpm(tied)
    llama = fold_into_llama(model)
    assert isinstance(llama, LlamaForCausalLM) and not llama.config.tie_word_embeddings
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[:1, :6]
    assert torch.equal(greedy(llama, prompt), greedy(model, prompt))


def test_scalings_are_applied():
    """Changing each muP scaling changes the logits (they are not silently ignored)."""
    ids = random_ids(1, 8)
    base = random_minicpm()(ids).logits
    for field, value in (("scale_emb", 1.0), ("scale_depth", 2.0), ("dim_model_base", 64)):
        assert not torch.allclose(random_minicpm(**{field: value})(ids).logits, base, atol=1e-4), field


def test_tied_and_untied_heads():
    tied, untied = random_minicpm(True), random_minicpm(False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_official_rope_keys_become_rope_parameters():
    config = tiny_config(VOCAB, rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters["rope_theta"] == 50000.0
    assert config.rope_parameters["rope_type"] == "linear"
    half_head = config.head_dim // 2
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * half_head,
        "long_factor": [2.0] * half_head,
        "original_max_position_embeddings": 128,
    }
    model = MiniCPMForCausalLM(tiny_config(VOCAB, rope_scaling=longrope)).eval()
    assert model.model.rotary_emb.rope_type == "longrope"
    assert model(random_ids(1, 8)).logits.isfinite().all()


def test_logits_to_keep():
    model = random_minicpm()
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- loading


def write_official_layout(model, folder, fmt):
    """A folder shaped like an official MiniCPM-2B checkpoint: remote-code auto_map whose files do
    not exist, legacy rope keys, tied head stored only as the embedding."""
    config = model.config
    config_json = {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
            "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
        },
        "model_type": "minicpm",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.1,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
        "scale_emb": config.scale_emb,
        "dim_model_base": config.dim_model_base,
        "scale_depth": config.scale_depth,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    state = {name: tensor.clone().contiguous() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tied", [True, False])
def test_official_layout_loads_natively(tmp_path, fmt, tied):
    model = random_minicpm(tied)
    folder = write_official_layout(model, tmp_path / "official", fmt)
    ids = random_ids(2, 12)
    expected = model(ids).logits
    # No trust_remote_code: the registered native class wins over auto_map...
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is MiniCPMForCausalLM
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=0, rtol=0)
    # ...and also when the caller does trust remote code (the remote files would not import anyway).
    assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)) is MiniCPMForCausalLM
    assert type(AutoConfig.from_pretrained(folder)) is MiniCPMConfig


def test_save_load_round_trip(tmp_path):
    model = random_minicpm(tied=False)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is MiniCPMForCausalLM
    assert loaded.config.to_dict()["rope_parameters"] == model.config.to_dict()["rope_parameters"]
    ids = random_ids(2, 12)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_llama_and_minicpm3_folders_load_through_auto_class(tmp_path):
    llama = LlamaForCausalLM(TINY_CONFIGS["llama"]())
    llama.save_pretrained(tmp_path / "llama")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "llama")) is LlamaForCausalLM

    AutoModelForCausalLM.from_config(TINY_CONFIGS["minicpm3"]()).save_pretrained(tmp_path / "minicpm3")
    minicpm3 = AutoModelForCausalLM.from_pretrained(tmp_path / "minicpm3")
    assert minicpm3.config.model_type == "minicpm3"
    module_names = {name.rsplit(".", 1)[-1] for name, _ in minicpm3.named_modules()}
    assert set(family_of(minicpm3).lora_targets(minicpm3.config)) <= module_names
    assert family_of(llama).lora_targets(llama.config) == ["q_proj", "v_proj"]
    assert family_of(tiny_config(VOCAB)).lora_targets(tiny_config(VOCAB)) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------- attention


def test_eager_and_sdpa_agree_on_logits_and_gradients():
    eager = random_minicpm(attn_implementation="eager")
    sdpa = random_minicpm(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row exercises the padding mask in both kernels
    outputs = []
    for model in (eager, sdpa):
        logits = model(ids, attention_mask=mask).logits
        (logits[mask.bool()] ** 2).mean().backward()
        outputs.append((logits, {name: p.grad for name, p in model.named_parameters()}))
    (eager_logits, eager_grads), (sdpa_logits, sdpa_grads) = outputs
    valid = mask.bool()
    torch.testing.assert_close(sdpa_logits[valid], eager_logits[valid], atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_left_padded_batch_generation_matches_single_samples():
    model = random_minicpm()
    prompts = [random_ids(1, 7, seed=3)[0], random_ids(1, 4, seed=4)[0]]
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    batch = greedy(model, input_ids, attention_mask=attention_mask)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None])
        assert torch.equal(batch[row, width:], alone[0, len(prompt) :]), row


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_keeps_attention_inside_each_sample(attn):
    model = random_minicpm(attn_implementation=attn)
    first, second = random_ids(1, 9, seed=5), random_ids(1, 6, seed=6)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, attention_mask=None).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
    torch.testing.assert_close(packed_logits, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 8, 1000])
@pytest.mark.parametrize("with_num_items", [False, True])
def test_chunked_loss_matches_full_logits_loss(chunk_size, with_num_items, fused):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64).float().requires_grad_()
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    labels[1, 7] = -100  # 16 labelled tokens after the shift minus ignored ones
    num_items = torch.tensor(23) if with_num_items else None

    expected = ForCausalLMLoss(head(hidden), labels, 50, num_items_in_batch=num_items)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight))
    loss = causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_size=chunk_size, fused=fused)
    grads = torch.autograd.grad(loss, (hidden, head.weight))

    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)
    # A bare weight matrix works the same as the module.
    torch.testing.assert_close(causal_lm_loss(hidden, head.weight, labels, num_items, chunk_size, fused=fused), loss)


def test_fused_loss_in_bf16_matches_the_checkpointed_path():
    """Same bf16 roundings as autograd's path: logits and gradients in bf16, softmax in fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(32, 301, bias=False, dtype=torch.bfloat16)
    labels = torch.randint(0, 301, (3, 40))
    labels[:, :10] = -100
    results = []
    for fused in (True, False):
        loss = causal_lm_loss(hidden, head, labels, chunk_size=16, fused=fused)
        results.append((loss, *torch.autograd.grad(loss, (hidden, head.weight))))
    for fused_value, checkpointed_value in zip(*results):
        torch.testing.assert_close(fused_value, checkpointed_value, atol=2e-3, rtol=2e-2)


def test_fused_loss_under_autocast_matches_the_checkpointed_path():
    """fp32 weights under bf16 autocast (the Trainer's --bf16 over an fp32 head, e.g. QLoRA's fp32 lm_head)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, 32, requires_grad=True)
    head = torch.nn.Linear(32, 101, bias=False)
    labels = torch.randint(0, 101, (2, 20))
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(hidden, head, labels, chunk_size=16, fused=fused)
        results.append((loss, *torch.autograd.grad(loss, (hidden, head.weight))))
    for fused_value, checkpointed_value in zip(*results):
        assert fused_value.dtype == checkpointed_value.dtype == torch.float32
        torch.testing.assert_close(fused_value, checkpointed_value, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("weight_trained", [False, True])
def test_fused_loss_computes_lm_head_once_less(weight_trained):
    """The checkpointed path runs lm_head again in backward; the fused one does not: for a frozen head
    (LoRA) 2 vocab-sized matmuls per chunk instead of 3, for a trained head 3 instead of 4."""
    from torch.utils.flop_counter import FlopCounterMode

    vocab, hidden_size, tokens = 64, 16, 24
    hidden = torch.randn(1, tokens + 1, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(weight_trained)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    one_matmul = 2 * vocab * hidden_size * tokens
    counted = {}
    for fused in (True, False):
        with FlopCounterMode(display=False) as counter:
            causal_lm_loss(hidden, head, labels, chunk_size=8, fused=fused).backward()
        counted[fused] = counter.get_total_flops()
    assert counted[True] == (3 if weight_trained else 2) * one_matmul
    assert counted[False] == (4 if weight_trained else 3) * one_matmul
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # evaluation: one matmul, no gradients
        causal_lm_loss(hidden, head, labels, chunk_size=8)
    assert counter.get_total_flops() == one_matmul


def test_fused_path_only_for_a_plain_head():
    from peft import LoraConfig, get_peft_model

    from minicpm_finetune.models.loss import fusable_weight

    model = random_minicpm(tied=False)
    assert fusable_weight(model.lm_head) is model.lm_head.weight
    hooked = torch.nn.Linear(4, 8, bias=False)
    hooked.register_forward_pre_hook(lambda module, args: None)  # as DeepSpeed ZeRO-3 gathers its weight
    assert fusable_weight(hooked) is None
    assert fusable_weight(torch.nn.Linear(4, 8, bias=True)) is None
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
    assert fusable_weight(wrapped.base_model.model.lm_head) is None


def test_chunked_loss_does_not_keep_chunk_logits_for_backward():
    """Saved activations stay far below one full (tokens x vocab) logits tensor, on both paths."""
    hidden = torch.randn(1, 512, 16, requires_grad=True)
    head = torch.nn.Linear(16, 4096, bias=False)
    labels = torch.randint(0, 4096, (1, 512))
    for fused in (True, False):
        saved = []

        def pack(tensor, saved=saved):  # this pass's list
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(hidden, head, labels, chunk_size=64, fused=fused)
        assert sum(saved) < 512 * 4096 / 4, fused


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = random_minicpm()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :4] = -100
    output = model(ids, labels=labels)
    assert output.logits is None
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=1e-6)
    with_count = model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(with_count, expected * 16 / 40, atol=1e-6, rtol=1e-6)


def test_lora_with_gradient_checkpointing_trains():
    from peft import LoraConfig, get_peft_model

    model = random_minicpm(num_hidden_layers=2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    model.train()
    ids = random_ids(4, 16)
    labels = ids.clone()
    labels[:, :5] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.9 * losses[0], losses


def test_loss_goes_through_a_peft_wrapped_lm_head():
    """The chunked loss calls lm_head as a module, so a LoRA on the head is part of the loss."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        random_minicpm(tied=False), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    ids = random_ids(2, 10)
    logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
