"""Score parity: a critic checkpoint this tool saved, run through verl's critic value path, gives our scores.

verl's critic forward lives in its FSDP engine (0.8+, registered for cuda/npu only) or in the legacy
`DataParallelPPOCritic` (up to 0.7, not in 0.9.1); both modules import ray. So verl's own functions run here
wherever they import without ray (from the installed verl 0.9.1: `left_right_2_no_padding`,
`build_attention_mask_from_nested`, `no_padding_2_padding`, `masked_mean`, `compute_position_id_with_mask`),
and the few tensor ops of the two forwards are reproduced line for line, citing the file and lines. On CPU
both sides run in float32: verl autocasts to bf16 on its device, which is not what is compared here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForTokenClassification

from critic.checkpoint import load_checkpoint, save_trial_checkpoint
from critic.config import ScoreConfig
from critic.score import score_pairs
from critic.trial import run_trial
from tests.helpers import demo_pairs, hand_pair_set, tiny_config, tiny_tolerance
from tests.verl_helpers import import_verl


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cache_dir):
    """A tiny Qwen2 critic trained 3 steps and saved by this tool (AutoModelForTokenClassification, num_labels=1)."""
    folder = tmp_path_factory.mktemp("parity")
    cfg = tiny_config(demo_pairs(folder / "pairs.parquet", 48), tiny_cache_dir)
    result = run_trial(cfg, keep_model=True)
    return save_trial_checkpoint(result, cfg, [], folder / "checkpoint")


def verl_critic(directory):
    """The checkpoint loaded as verl loads a critic: verl/utils/model.py load_valuehead_model (0.9.1, L641-652),
    AutoModelForTokenClassification with the checkpoint's config; sdpa instead of its flash_attention_2 (GPU only)."""
    config = AutoConfig.from_pretrained(directory)
    return AutoModelForTokenClassification.from_pretrained(directory, torch_dtype=torch.float32, config=config,
                                                           attn_implementation="sdpa").eval()


def parity_pairs(tokenizer):
    """Demo-like pairs plus the edge cases: EOS-only, an EOS id inside a response, truncated (no EOS)."""
    eos = tokenizer.eos_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [(ids("What is 12 + 30?\n"), ids("12 + 30 = 42. The answer is 42.") + [eos], ids("It is 52.") + [eos]),
            (ids("Ana has 4 apples and buys 2 packs of 3. How many?\n"), ids("4 + 2 * 3 = 10.") + [eos], [eos]),
            (ids("What is 7 * 6?\n"), ids("7 * 6 = 42.") + [eos] + ids(" Done.") + [eos], ids("42") + [eos]),
            (ids("Sum 1 to 5.\n"), ids("1 + 2 + 3 + 4 + 5 = 15, so"), ids("15") + [eos])]  # truncated teacher
    pairs = hand_pair_set([(p, t, s, t[-1] == eos, s[-1] == eos) for p, t, s in rows])
    pairs.eos_id = eos
    return pairs


def verl_layout(prompts, responses, pad_id):
    """A rollout batch as verl holds it: prompts left-padded, responses right-padded (DataProto.batch keys)."""
    prompt_width, response_width = max(map(len, prompts)), max(map(len, responses))
    input_ids = torch.full((len(prompts), prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        span = slice(prompt_width - len(prompt), prompt_width + len(response))
        input_ids[row, span] = torch.tensor(np.concatenate([prompt, response]), dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = import_verl("verl.utils.model").compute_position_id_with_mask(attention_mask)
    # verl/trainer/ppo/ray_trainer.py compute_response_mask (0.9.1, L120-135): attention_mask[:, -response_length:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "prompts": input_ids[:, :prompt_width], "responses": input_ids[:, prompt_width:],
            "response_mask": attention_mask[:, prompt_width:]}


def engine_values(model, batch, pad_id) -> torch.Tensor:
    """(B, R) values by verl 0.9.1's critic path without remove-padding (the CPU path)."""
    from tensordict import TensorDict
    padding = import_verl("verl.workers.utils.padding")
    data = padding.left_right_2_no_padding(TensorDict(dict(batch), batch_size=[len(batch["input_ids"])]))
    nested_ids = data["input_ids"]
    n, max_len = len(batch["input_ids"]), int(nested_ids.offsets().diff().max())
    # FSDPEngine.prepare_model_inputs, use_remove_padding=False (workers/engine/fsdp/transformer_impl.py L1274-1308)
    input_ids = torch.nested.to_padded_tensor(nested_ids, padding=pad_id, output_size=(n, max_len))
    position_ids = torch.nested.to_padded_tensor(data["position_ids"], padding=0, output_size=(n, max_len))
    attention_mask = padding.build_attention_mask_from_nested(input_ids=nested_ids, max_seq_len=max_len)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    # FSDPEngineWithValueHead.prepare_model_outputs, use_remove_padding=False (same file, L1626-1642)
    values = output.logits.squeeze(-1)
    cu_seqlens = nested_ids.offsets()
    seq_lengths = cu_seqlens.diff()
    values = torch.nested.narrow(values, 1, torch.zeros_like(seq_lengths), seq_lengths, layout=torch.jagged)
    values = torch.nested.nested_tensor_from_jagged(torch.cat(list(values.unbind())), cu_seqlens)
    return padding.no_padding_2_padding(values, data)  # workers/utils/losses.py value_loss (L159): vpreds


def legacy_values(model, batch) -> torch.Tensor:
    """(B, R) values by DataParallelPPOCritic._forward_micro_batch without remove-padding
    (verl 0.5-0.7 workers/critic/dp_critic.py; 0.7.1 L113-125)."""
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False)
    response_length = batch["responses"].size(-1)
    return output.logits[:, -response_length - 1:-1].squeeze(-1)


@pytest.mark.parametrize("forward", ["engine (0.9.1)", "legacy dp_critic (<=0.7)"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_our_scores_equal_verls_masked_mean_of_values(checkpoint, forward, layout, torch_threads):
    ours_model, tokenizer, _, _ = load_checkpoint(checkpoint)
    verl_model, pad_id = verl_critic(checkpoint), tokenizer.pad_token_id
    masked_mean = import_verl("verl.utils.torch_functional").masked_mean
    pairs = parity_pairs(tokenizer)
    index = np.arange(len(pairs.prompt_ids))
    worst, magnitude = 0.0, 0.0
    for which in ("teacher", "student"):
        batch = verl_layout(pairs.prompt_ids, getattr(pairs, f"{which}_ids"), pad_id)
        values = engine_values(verl_model, batch, pad_id) if forward.startswith("engine") else \
            legacy_values(verl_model, batch)
        not_eos = batch["responses"] != tokenizer.eos_token_id
        # verl's response mask keeps EOS: our exclude_eos false. The users' mask drops EOS ids: our eos_rule token.
        for score_cfg, mask in ((ScoreConfig(exclude_eos=False, layout=layout), batch["response_mask"]),
                                (ScoreConfig(eos_rule="token", layout=layout), batch["response_mask"] * not_eos)):
            with torch.no_grad():
                scores = score_pairs(ours_model, pairs, index, pad_id, score_cfg, torch.device("cpu"))
            ours = scores[0] if which == "teacher" else scores[1]
            theirs = masked_mean(values, mask, axis=-1)
            worst = max(worst, float((ours - theirs).abs().max()))
            magnitude = max(magnitude, float(theirs.abs().max()))
    # the same values summed in another order (packed rows, other padding): tests/helpers.py tiny_tolerance
    row = max(len(p) + len(t) + len(s) for p, t, s in zip(pairs.prompt_ids, pairs.teacher_ids, pairs.student_ids))
    tolerance = tiny_tolerance(magnitude, row)
    print(f"\n[parity] {forward}, {layout}: max |ours - verl| = {worst:.2e} (bound {tolerance:.2e})")
    assert worst <= tolerance
