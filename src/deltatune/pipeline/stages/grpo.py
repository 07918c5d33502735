"""Group relative policy optimisation: sample completions, score them, and make the better ones of each group more
likely (Shao et al. 2024, DeepSeekMath).

Data: prompts with a reference answer, in the formats SFT already reads, `instruction` rows (instruction, input,
output) and `chat` rows ending in an assistant turn. The prompt is the row rendered with its chat template up to the
last answer (what the last run of labelled tokens starts after: the template's generation prompt included); that
answer, decoded, is the reference the reward functions see (exact_match, contains). Rows are encoded, checked and
truncated exactly as for SFT (`deltatune data` shows them), and data.answer_only must stay true so that the answer is
the only labelled span.

Per prompt x, G = grpo.num_generations completions y_1..y_G are sampled with model.generate, under no_grad, in eval
mode, with the delta active (the policy at sampling time, pi_old), at grpo.temperature, up to grpo.max_new_tokens,
stopping at the tokenizer's eos or the template's end-of-turn token. The sampling is seeded from train.seed, the
prompt's token ids, its place in the micro-batch and a fingerprint of the trained weights (their float64 sum), under
torch.random.fork_rng so the run's own random stream is not touched: a resumed run (the same weights) repeats the
same samples, while a prompt seen again after updates gets fresh noise rather than the draws of its last visit. Each completion gets a reward R_i (the sum of the grpo.rewards
functions), and, with the group's mean and (unbiased) standard deviation,

    A_i     = (R_i - mean R) / (std R + 1e-4)                      shared by every token of y_i
    rho_t   = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)            computed as exp(logp - logp.detach()): 1 in
                                                                    value (one update per generation), grad logp
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           the k3 estimator of KL(pi || pi_ref), ref_t the
                                                                    reference's log-prob (reference.py)
    loss_t  = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t
    loss_i  = mean of loss_t over y_i's tokens (up to and with its stop token)

(grpo.loss_type dr_grpo and dapo weigh the tokens otherwise, and grpo.scale_rewards: none drops the division by the
group's std: see `group_loss` and `group_advantages`.)

The stage returns the sum of loss_i over the batch's completions; each prompt is G loss items, so the loop's division
averages over completions. eps = grpo.epsilon (0.2); beta = grpo.beta, 0.0 by default as in TRL (GRPOConfig.beta,
read in TRL 1.16.0; DeepSeek-R1 used 0.001); beta = 0 skips the reference forward. Every method trains: with beta > 0
the reference is the delta switched off, or for full, freeze and bitfit a frozen copy of the base (reference.py). Log-probabilities are taken at the sampling temperature (logits / T), as TRL does.

Memory: per-token log-probabilities are needed (not only sums), so the policy's forward asks the model for the logits
of the completion positions only (`logits_to_keep`, or the full logits sliced where a model lacks it): G x C x V
floats per prompt for C completion tokens, never the prompt's positions. Prompts are processed one group at a time
(G rows, no left padding, so positions need no care), which keeps the peak at one group's activations.

Logged per step (TRL's names), means over the step's completions: reward, reward_std (the groups' standard
deviations), kl (the per-completion mean of KL_t; 0 when beta = 0, as nothing is computed) and completion_length.
Evaluation samples G completions per eval prompt as training does (same G, temperature and seeding; see `evaluate`)
and reports reward, reward_std, completion_length and, with several rewards, rewards/<name>/mean, logged as
eval_reward and so on; generation metrics against the reference answers are added when eval.generate.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ...config import check
from ..data import IGNORE, Example
from . import Stage
from .reference import reference as reference_of

SCALE_EPS = 1e-4  # added to the group's standard deviation


@dataclass(kw_only=True)
class GrpoSection:
    """The `grpo:` section of a run config."""

    # reward functions, summed: built-in names (exact_match, contains, length) or `path/to/file.py:function`
    rewards: list[str] = check(default_factory=list)
    num_generations: int = check(8, ge=2)  # G: completions sampled per prompt
    max_new_tokens: int = check(64, gt=0)
    temperature: float = check(1.0, gt=0)
    epsilon: float = check(0.2, gt=0, lt=1)  # the clipping range of the ratio
    beta: float = check(0.0, ge=0)  # the weight of KL(pi || pi_ref); 0: no reference forward
    length_target: int = check(32, ge=0)  # the `length` reward's target, in completion tokens
    # how token losses become the group's loss: "grpo" (each completion's mean over its tokens), "dr_grpo" (each
    # completion's sum over max_new_tokens, a constant: no length bias), "dapo" (the mean over every token of the
    # group: a long completion's tokens weigh as much as a short one's)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    # "group": A_i = (R_i - mean) / (std + 1e-4), as in the paper; "none": R_i - mean only (Dr. GRPO: dividing by
    # the group's std over-weights groups whose rewards barely differ)
    scale_rewards: Literal["group", "none"] = "group"


# ---------------------------------------------------------------- rewards

def _exact_match(text: str, answer: str, tokens: int, settings: GrpoSection) -> float:
    return float(text.strip() == answer.strip())


def _contains(text: str, answer: str, tokens: int, settings: GrpoSection) -> float:
    return float(bool(answer.strip()) and answer.strip() in text)


def _length(text: str, answer: str, tokens: int, settings: GrpoSection) -> float:
    return -abs(tokens - settings.length_target)


BUILTIN_REWARDS: dict[str, Callable[[str, str, int, GrpoSection], float]] = {
    "exact_match": _exact_match, "contains": _contains, "length": _length}


@functools.lru_cache(maxsize=None)
def _user_reward(spec: str) -> Callable[[str, str], float]:
    """The user's function `file.py:name`, called as fn(completion, answer) -> float. It is the user's own code,
    imported and run only because the config names it."""
    path, name = spec.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location(f"deltatune_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"grpo.rewards: {path} has no function {name!r}")
    return fn


def _reward_problem(spec: str) -> str | None:
    if spec in BUILTIN_REWARDS:
        return None
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path = spec.rsplit(":", 1)[0]
        return None if Path(path).is_file() else f"grpo.rewards: {spec!r}: no file {path}"
    return (f"grpo.rewards: {spec!r} is not a reward; the built-ins are {', '.join(BUILTIN_REWARDS)}, or name your "
            "own function as path/to/file.py:function")


def reward_functions(settings: GrpoSection) -> list[Callable[[str, str, int], float]]:
    """One function (text, answer, tokens) -> float per grpo.rewards entry."""
    out = []
    for spec in settings.rewards:
        if spec in BUILTIN_REWARDS:
            builtin = BUILTIN_REWARDS[spec]
            out.append(lambda text, answer, tokens, f=builtin: f(text, answer, tokens, settings))
        else:
            user = _user_reward(spec)
            out.append(lambda text, answer, tokens, f=user: float(f(text, answer)))
    return out


# ---------------------------------------------------------------- the math

def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """A_i = (R_i - mean R) / (std R + 1e-4) within each group, or R_i - mean R with scale "none"; (P, G) -> (P, G)."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred if scale == "none" else centred / (rewards.std(-1, keepdim=True) + SCALE_EPS)


def group_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """One group's loss as the sum over its G loss items (the loop divides by G), from token losses (G, C):

        grpo     sum_i  mean_t loss_it                    every completion weighs 1, its tokens 1/|y_i|
        dr_grpo  sum_i  sum_t loss_it / max_new_tokens    every token weighs 1/L, L constant (Liu et al. 2025)
        dapo     G * sum_it loss_it / sum_i |y_i|         every token of the group weighs alike (Yu et al. 2025;
                                                          normalised per group here, not over the whole batch)"""
    weights = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return sequence_means(per_token, mask).sum()
    total = (per_token * weights).sum()
    if loss_type == "dr_grpo":
        return total / max_new_tokens
    return per_token.shape[0] * total / weights.sum().clamp(min=1.0)


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1, per token: an unbiased, non-negative estimate of KL(pi || pi_ref)."""
    delta = ref - logp
    return torch.exp(delta) - delta - 1.0


def token_losses(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                 beta: float = 0.0, ref: torch.Tensor | None = None) -> torch.Tensor:
    """The clipped surrogate plus beta KL, per token: logp, old, ref (G, C), advantages (G,) -> (G, C)."""
    ratio = torch.exp(logp - old)  # (G, C)
    a = advantages[:, None]
    out = -torch.minimum(ratio * a, ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * a)
    if beta and ref is not None:
        out = out + beta * kl_k3(logp, ref)
    return out


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's values over its completion tokens, (G, C) -> (G,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


# ---------------------------------------------------------------- data

def _answer_start(labels: list[int]) -> int:
    """Where the last run of labelled tokens starts (the last answer), or len(labels) where none is labelled."""
    end = max((i for i, t in enumerate(labels) if t != IGNORE), default=-1)
    if end < 0:
        return len(labels)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def rows(example: Example, settings: GrpoSection) -> tuple[Example, ...]:
    """The G rows a prompt puts into the training forward: its prompt and up to max_new_tokens sampled tokens each
    (the longest they can be: the plan sizes for it, and tokens/s counts it, an upper bound where completions stop
    early)."""
    prompt = example.input_ids[: _answer_start(example.labels)]
    row = Example(prompt + [0] * settings.max_new_tokens, [IGNORE] * len(prompt) + [0] * settings.max_new_tokens)
    return (row,) * settings.num_generations


def items(example: Any, config: Any) -> int:
    return config.stage_settings["grpo"].num_generations  # G completions, G loss items


# The loop hands the tokenizer to the collator only; the collator leaves what the loss needs to decode and stop
# here, keyed by the run config's id.
_DECODING: dict[int, tuple[Any, list[int], str]] = {}


def collator(config: Any, tokenizer: Any) -> Callable[[list[Example]], dict[str, Any]]:
    from ..render import Renderer

    renderer = Renderer(tokenizer, config.data)
    _DECODING[id(config)] = (tokenizer, renderer.stop_ids(), renderer.end_of_turn().strip())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(examples: list[Example]) -> dict[str, Any]:
        starts = [_answer_start(e.labels) for e in examples]
        answers = [[t for t in e.labels[s:] if t != IGNORE] for e, s in zip(examples, starts)]
        width, answer_width = max(starts), max(1, max(len(a) for a in answers))
        prompts = torch.full((len(examples), width), pad, dtype=torch.long)
        answer_ids = torch.full((len(examples), answer_width), IGNORE, dtype=torch.long)
        for i, (e, s, a) in enumerate(zip(examples, starts, answers)):
            prompts[i, :s] = torch.tensor(e.input_ids[:s], dtype=torch.long)
            answer_ids[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        return {"prompt_ids": prompts, "prompt_lengths": torch.tensor(starts), "answer_ids": answer_ids}

    return collate


def _decoding(config: Any) -> tuple[Any, list[int], str]:
    if id(config) not in _DECODING:
        raise RuntimeError("the GRPO loss needs the stage's collator built first (it records the tokenizer)")
    return _DECODING[id(config)]


def _answer_text(tokenizer: Any, ids: torch.Tensor, end_of_turn: str) -> str:
    text = tokenizer.decode([t for t in ids.tolist() if t != IGNORE], skip_special_tokens=True).strip()
    if end_of_turn and text.endswith(end_of_turn):
        text = text[: -len(end_of_turn)].strip()
    return text


# ---------------------------------------------------------------- sampling and scoring

def weights_fingerprint(model: torch.nn.Module) -> float:
    """A number that changes with every update of the trained weights: the sum of their values (float64)."""
    with torch.no_grad():
        sums = [p.detach().sum(dtype=torch.float64) for p in model.parameters() if p.requires_grad]
        return float(torch.stack(sums).sum()) if sums else 0.0


def sample_seed(seed: int, prompt: torch.Tensor, position: int, fingerprint: float = 0.0) -> int:
    """A seed fixed by train.seed, the prompt's token ids, its place in the micro-batch and the trained weights."""
    digest = hashlib.sha256(f"{seed}:{position}:{fingerprint!r}:{prompt.tolist()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def completion_mask(completions: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 for each completion's tokens up to and with its first stop token, (G, C)."""
    positions = torch.arange(completions.shape[1], device=completions.device)
    if not stops:
        return torch.ones_like(completions)
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    first = torch.where(is_stop.any(-1), is_stop.float().argmax(-1), completions.shape[1])  # (G,)
    return (positions[None, :] <= first[:, None]).long()


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: torch.Tensor, settings: GrpoSection, seed: int, stops: list[int],
           pad_id: int) -> torch.Tensor:
    """G completions of `prompt` (P,) from the policy as it is now, (G, C); deterministic for a given seed."""
    was_training = model.training
    model.eval()  # no dropout in the sampling policy
    device = prompt.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            rows = prompt[None, :].repeat(settings.num_generations, 1)
            out = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=True,
                                 temperature=settings.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=settings.max_new_tokens, eos_token_id=stops or None,
                                 pad_token_id=pad_id)
    finally:
        model.train(was_training)
    return out[:, prompt.shape[0]:]


def token_log_probs(forward: Callable[..., Any], model: torch.nn.Module, rows: torch.Tensor, mask: torch.Tensor,
                    completion: int, temperature: float) -> torch.Tensor:
    """log pi(token) of the last `completion` tokens of each row, (G, C), from those positions' logits only."""
    kwargs: dict[str, Any] = {"input_ids": rows, "attention_mask": mask, "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = completion + 1
    logits = forward(**kwargs).logits[:, -(completion + 1):-1].float() / temperature  # (G, C, V)
    return logits.log_softmax(-1).gather(-1, rows[:, -completion:, None]).squeeze(-1)


def reward_names(settings: GrpoSection) -> list[str]:
    """A short name per grpo.rewards entry, for the per-reward metrics: the built-in's name or the user function's
    (the whole spec where two entries would share a name)."""
    short = [spec if spec in BUILTIN_REWARDS else spec.rsplit(":", 1)[1] for spec in settings.rewards]
    return [name if short.count(name) == 1 else spec for name, spec in zip(short, settings.rewards)]


def score_group(model: torch.nn.Module, prompt: torch.Tensor, answer: str, config: Any,
                position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one prompt's G completions and score them: (completions (G, C), their mask up to and with the stop
    token (G, C), the rewards of each function (G, F)). Deterministic for given weights, prompt and position."""
    settings: GrpoSection = config.stage_settings["grpo"]
    tokenizer, stops, _ = _decoding(config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seed = sample_seed(config.train.seed, prompt, position, weights_fingerprint(model))
    completions = sample(model, prompt, settings, seed, stops, pad)
    keep = completion_mask(completions, stops)  # (G, C)
    lengths = keep.sum(-1)
    texts = [tokenizer.decode(c[:n].tolist(), skip_special_tokens=True) for c, n in zip(completions, lengths)]
    functions = reward_functions(settings)
    rewards = torch.tensor([[f(text, answer, int(n)) for f in functions] for text, n in zip(texts, lengths)],
                           dtype=torch.float32, device=prompt.device)  # (G, F)
    return completions, keep, rewards


def group_terms(forward: Callable[..., Any], model: torch.nn.Module, prompt: torch.Tensor, answer: str,
                config: Any, position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One prompt's G completions: the sum of their per-sequence losses, and the sums of the metrics."""
    settings: GrpoSection = config.stage_settings["grpo"]
    completions, keep, per_function = score_group(model, prompt, answer, config, position)
    lengths = keep.sum(-1)
    rewards = per_function.sum(-1)  # (G,): the functions are summed
    advantages = group_advantages(rewards[None, :], settings.scale_rewards)[0]
    rows = torch.cat([prompt[None, :].repeat(completions.shape[0], 1), completions], dim=1)  # (G, P + C)
    mask = torch.cat([torch.ones_like(rows[:, :prompt.shape[0]]), keep], dim=1)
    width = completions.shape[1]
    reference = None
    if settings.beta:
        with torch.no_grad(), reference_of(model) as ref:
            reference = token_log_probs(ref, ref, rows, mask, width, settings.temperature)
    logp = token_log_probs(forward, model, rows, mask, width, settings.temperature)
    per_token = token_losses(logp, logp.detach(), advantages, settings.epsilon, settings.beta, reference)
    total = group_loss(per_token, keep, settings.loss_type, settings.max_new_tokens)
    with torch.no_grad():
        G = rewards.numel()
        kl = sequence_means(kl_k3(logp, reference), keep) if reference is not None else torch.zeros(G)
        metrics = {"reward": rewards.sum(), "reward_std": rewards.std() * G, "kl": kl.sum(),
                   "completion_length": lengths.sum().float()}
    return total, metrics


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
         config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokenizer, _, end_of_turn = _decoding(config)
    total: torch.Tensor | None = None
    sums: dict[str, torch.Tensor] = {}
    for b in range(batch["prompt_ids"].shape[0]):
        prompt = batch["prompt_ids"][b, : int(batch["prompt_lengths"][b])]
        answer = _answer_text(tokenizer, batch["answer_ids"][b], end_of_turn)
        group_loss, metrics = group_terms(forward, model, prompt, answer, config, b)
        total = group_loss if total is None else total + group_loss
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    return total, sums


@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: Any, config: Any, tokenizer: Any) -> dict[str, float]:
    """Sample G completions per eval prompt exactly as training does (grpo.num_generations at grpo.temperature)
    and report their mean reward, the mean of the groups' standard deviations, the mean completion length and,
    with several reward functions, each one's mean (`rewards/<name>/mean`, TRL's name).

    The same sampling as training, not one greedy answer: reward_std needs a group, and the eval numbers then
    read on the same scale as the training log's. Seeds come from the weights, the prompt and its place in the
    eval set, so two evaluations of the same weights give the same numbers; the places are negative (-1 for the
    first eval prompt), so an eval prompt that is also a training prompt never replays a training step's draws."""
    settings: GrpoSection = config.stage_settings["grpo"]
    collate = collator(config, tokenizer)  # records the tokenizer and stop tokens that score_group decodes with
    _, _, end_of_turn = _decoding(config)
    device = next(model.parameters()).device
    names = reward_names(settings)
    per_function = torch.zeros(len(names), dtype=torch.float64)
    reward_sum = std_sum = length_sum = 0.0
    completions = groups = 0
    for i in range(0, len(prepared.eval), config.eval.batch_size):
        batch = collate(prepared.eval[i:i + config.eval.batch_size])
        for b in range(batch["prompt_ids"].shape[0]):
            prompt = batch["prompt_ids"][b, : int(batch["prompt_lengths"][b])].to(device)
            answer = _answer_text(tokenizer, batch["answer_ids"][b], end_of_turn)
            _, keep, rewards = score_group(model, prompt, answer, config, -1 - (i + b))
            total = rewards.sum(-1)  # (G,)
            per_function += rewards.sum(0).double().cpu()
            reward_sum += total.sum().item()
            std_sum += total.std().item()
            length_sum += keep.sum().item()
            completions += total.numel()
            groups += 1
    if not groups:
        return {}
    metrics = {"reward": reward_sum / completions, "reward_std": std_sum / groups,
               "completion_length": length_sum / completions}
    if len(names) > 1:
        means = per_function.div(completions).tolist()
        metrics.update({f"rewards/{name}/mean": value for name, value in zip(names, means)})
    return metrics


def check_config(config: Any) -> str | None:
    """Why this run cannot train with GRPO, or None."""
    settings: GrpoSection = config.stage_settings["grpo"]
    fmt = config.data.format
    if fmt not in ("instruction", "chat"):
        return (f"stage = 'grpo' samples answers to prompts, read from instruction rows (instruction, input, output: "
                f"the reference answer) or chat rows ending in an assistant answer; data.format is {fmt!r}")
    if config.model.task != "causal_lm":
        return f"stage = 'grpo' trains causal LMs; model.task is {config.model.task!r}: set model.task: causal_lm"
    if config.data.packing:
        return "stage = 'grpo' does not pack: each prompt is sampled from on its own; set data.packing: false"
    if not config.data.answer_only:
        return ("stage = 'grpo' takes the prompt as everything before the labelled answer; data.answer_only: false "
                "labels the prompt too: drop it")
    if not settings.rewards:
        return ("stage = 'grpo' needs rewards to score the sampled completions: set grpo.rewards, e.g. "
                f"[contains], from {', '.join(BUILTIN_REWARDS)} or path/to/file.py:function")
    for spec in settings.rewards:
        problem = _reward_problem(spec)
        if problem:
            return problem
    if config.train.label_smoothing:
        return "train.label_smoothing smooths the SFT loss and has no meaning for GRPO: drop it"
    return None


GRPO = Stage(name="grpo", formats=frozenset({"instruction", "chat"}), items=items, collator=collator, loss=loss,
             settings=GrpoSection, check=check_config, evaluate=evaluate, rows=rows,
             reference=lambda config: bool(config.stage_settings["grpo"].beta))
