"""SPO's step-wise sampler: branch k candidates at every step, judge them, keep decisive pairs.

Per batch of b prompts and a DDIM schedule t_0 > t_1 > ... > t_{N-1} (SD1.5: 951, 901, ..., 1):

1. steps 0 .. divert_start_step-1 denoise normally from x_T;
2. at every later step i, from the shared x_{t_i} draw k candidates x_{t_{i+1}}^j with the DDIM posterior
   (one mean, k independent noises). Each candidate is judged on its own x0-prediction at its own
   timestep t_{i+1}: the next guided UNet pass runs on all k candidates, each x0-prediction is decoded
   and scored. That same pass provides the posterior of the candidate the chain continues from, so
   branching costs no extra UNet calls. At the last step the candidates are final latents, judged at t = 0;
3. ``select_pair`` keeps (x_{t_i}, best, worst, t_i, prompt) when the judge is decisive;
4. the chain continues from a candidate drawn uniformly at random (not the winner), so later steps
   see states from the model's own distribution rather than a judge-steered one.

The loop is :func:`branching_sample`, which GradSPO's sampler (``spotune.diffusion.gradspo_sampler``)
shares: its ``ending`` adds what GradSPO changes (each pair's noise offset, and its two ends of the chain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from spotune.diffusion.ddim import ddim_posterior, ddim_step_with_logprob, predict_x0_and_eps, previous_timestep
from spotune.diffusion.tree import SamplingTree
from spotune.models.conditioning import Conditioning
from spotune.models.family import vae_scale_factor
from spotune.preference.protocol import PreferenceModel
from spotune.preference.select import select_pair


def guided_noise_pred(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guided UNet output, one UNet call on the [uncond; cond] batch.

    Args:
        latents: [B, C, h, w] x_t.
        timesteps: [B] long timesteps (or a scalar tensor).
        cond: B rows of prompt conditioning (any family: SDXL's pooled embedding and time ids ride along).
        uncond: 1 or B rows of the negative prompt's conditioning.
        guidance_scale: w in ``uncond + w * (cond - uncond)``; 1.0 skips the unconditional half.
    Returns:
        [B, C, h, w] guided model output in the UNet's output dtype.
    """
    batch = latents.shape[0]
    t = torch.as_tensor(timesteps, device=latents.device)
    t = t.expand(batch) if t.dim() == 0 else t
    if guidance_scale == 1.0:
        return unet(latents, t, **cond.unet_kwargs()).sample
    both = Conditioning.cat([uncond.expand(batch).to(dtype=cond.dtype), cond])
    out = unet(torch.cat([latents, latents]), torch.cat([t, t]), **both.unet_kwargs()).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


class RowChunkedUNet:
    """A UNet called on at most ``rows`` input rows at a time; the outputs are concatenated in order.

    Sampling runs the UNet on every candidate at once, two rows each under classifier-free guidance
    ([uncond; cond]): 80 rows of 64x64 latents for the SD1.5 recipe's 40 candidates, whose activations are
    the sampling peak once training is made small. Each row's output depends on that row alone, so
    splitting them changes the maths in nothing but floating-point order (as ``decode_chunk_size`` does
    for the VAE). Attributes (``config``, ``dtype``, ...) are the wrapped UNet's.
    """

    def __init__(self, unet, rows: int) -> None:
        self.unet = unet
        self.rows = rows

    def __getattr__(self, name: str):
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs):
        """``unet(sample [N, C, h, w], timestep [N] or scalar, **kwargs)``; N-row tensors (and dicts of them) are split."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        n = sample.shape[0]
        if n <= self.rows:
            return self.unet(sample, timestep, **kwargs)
        parts = []
        for start in range(0, n, self.rows):
            rows = slice(start, start + self.rows)
            parts.append(self.unet(sample[rows], _rows_of(timestep, rows, n), **_rows_of(kwargs, rows, n)).sample)
        return UNet2DConditionOutput(sample=torch.cat(parts))


def _rows_of(value, rows: slice, n: int):
    """``value[rows]`` for a tensor of ``n`` rows (recursively through dicts); anything else as it is."""
    if isinstance(value, dict):
        return {key: _rows_of(item, rows, n) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[rows]
    return value


def sampling_unet(unet, micro_batch_rows: int | None):
    """``unet``, or a :class:`RowChunkedUNet` of it when ``micro_batch_rows`` (sample_micro_batch_size) is set."""
    return RowChunkedUNet(unet, micro_batch_rows) if micro_batch_rows else unet


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` for :func:`auto_decode_chunk_size`: CUDA's figure, ``None`` off CUDA.

    ``spotune plan`` replaces it with the planned card's memory less what is live.
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def auto_decode_chunk_size(vae, latents: torch.Tensor, fraction: float = 0.5) -> int:
    """How many latents to decode at once so the decoder's activations fit in free CUDA memory.

    The VAE decoder's peak is dominated by its last up-block at full resolution: about 128 channels x
    H x W values, held a few times over (input, normalised, activated, the convolution's output). That is
    estimated as ``6 * 128 * H * W`` values per image and ``fraction`` of the device's free memory is
    given to it. Off CUDA there is no free-memory figure to size by, so the whole batch is decoded.

    Args:
        latents: [B, 4, h, w] the latents about to be decoded.
    Returns:
        a chunk size in [1, B].
    """
    batch = latents.shape[0]
    free = free_device_memory(latents.device) if batch else None
    if free is None:
        return max(batch, 1)
    factor = vae_scale_factor(vae)
    height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
    width_channels = vae.config.block_out_channels[0]
    per_image = 6 * width_channels * height * width * torch.finfo(vae.dtype).bits // 8
    return int(max(1, min(batch, (free * fraction) // per_image)))


def decode_latents(vae, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """[B, 4, h, w] latents -> [B, 3, H, W] images in about [-1, 1], decoded in chunks to bound memory.

    ``chunk_size`` 0 sizes the chunks by free CUDA memory (:func:`auto_decode_chunk_size`).
    """
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    if chunk_size <= 0:
        chunk_size = auto_decode_chunk_size(vae, latents)
    parts = []
    for chunk in latents.split(chunk_size):
        z = chunk.to(vae.dtype) / scale + shift
        parts.append(vae.decode(z).sample)
    return torch.cat(parts)


@dataclass
class StepPairs:
    """Training tuples kept by a sampler, N of them.

    Attributes:
        latents: [N, C, h, w] x_t the winning step starts from (for SPO, the x_t both candidates share).
        win, lose: [N, C, h, w] the preferred and the rejected x_{t-1}.
        timesteps: [N] long, t of x_t.
        cond: N rows of the tuple's prompt conditioning (embeddings; for SDXL also pooled and time ids).
        prompt_index: [N] long, index of the prompt in its sampling batch.
        step_index: [N] long, index i of the denoising step.
        latents_lose: [N, C, h, w] x_t the losing step starts from, for tuples whose two steps may start
            from different states (trajectory pairs; the SDXL sampler's segments); ``None`` when every
            tuple's steps share ``latents``, as with the SD1.5 sampler.
        noise_delta: [N, C, h, w] float32 (z_win - z_lose) / 2 of the standard-normal draws behind the two
            candidates, only for GradSPO (the winner's offset; the loser's is its negative); else ``None``.
        shared: [N] bool, only beside ``latents_lose`` from the SDXL sampler: True where the two steps do
            start from one x_t (a branching transition; ``latents_lose`` then equals ``latents``), so
            training evaluates that state once. ``None`` with ``latents_lose`` set: no tuple shares x_t.
    """

    latents: torch.Tensor
    win: torch.Tensor
    lose: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    prompt_index: torch.Tensor
    step_index: torch.Tensor
    latents_lose: torch.Tensor | None = None
    noise_delta: torch.Tensor | None = None
    shared: torch.Tensor | None = None

    def two_state(self) -> torch.Tensor | None:
        """[N] bool: the tuples whose losing step starts from its own x_t; ``None`` when none does."""
        if self.latents_lose is None:
            return None
        if self.shared is None:
            return torch.ones(len(self), dtype=torch.bool, device=self.latents.device)
        return ~self.shared

    def __len__(self) -> int:
        return self.latents.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, flat by name (the conditioning's as ``cond.<field>``; unset optional fields left out)."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        out.update({f"cond.{k}": v for k, v in self.cond.tensors().items()})
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "StepPairs":
        """The inverse of :meth:`tensors`."""
        cond = Conditioning(**{k[5:]: v for k, v in tensors.items() if k.startswith("cond.")})
        return StepPairs(cond=cond, **{k: v for k, v in tensors.items() if not k.startswith("cond.")})

    def select(self, index: torch.Tensor) -> "StepPairs":
        return StepPairs.from_tensors({k: v[index] for k, v in self.tensors().items()})

    def to(self, device: torch.device | str) -> "StepPairs":
        return StepPairs.from_tensors({k: v.to(device) for k, v in self.tensors().items()})

    @staticmethod
    def cat(parts: list["StepPairs"]) -> "StepPairs":
        return StepPairs.from_tensors({k: torch.cat([p.tensors()[k] for p in parts]) for k in parts[0].tensors()})

    @staticmethod
    def empty_like(latents: torch.Tensor, cond: Conditioning, trajectory: bool = False) -> "StepPairs":
        """No tuples, with the right trailing shapes, dtypes and device."""
        none = latents[:0]
        index = torch.zeros(0, dtype=torch.long, device=latents.device)
        return StepPairs(none, none, none, index, cond.select(slice(0, 0)), index, index, none if trajectory else None)


@dataclass
class SamplingResult:
    """What one SPO sampling round produced.

    Attributes:
        pairs: the decisive tuples (may be empty).
        final_latents: [b, C, h, w] the end of the continued chain (the SDXL sampler: [k*b, C, h, w], its
            k chains' ends, row j*b + p).
        scores: [S, k, b] judge scores of every candidate at each of the S judging steps.
        valid: [S, b] which pairs were decisive.
        choices: [S, b] the candidate each chain continued from (the SDXL sampler: [S-1, b], one per
            judged step that branches again).
        judge_calls: number of calls to ``judge.score``.
        unet_calls: number of guided UNet passes (each on a batch of b or k*b latents).
        judged_steps: S step indices, the denoising step i each row of ``scores`` belongs to (the step whose
            candidates were judged; the SDXL sampler: the evaluation step that closed the segment).
        tree: the recorded prompt's sampling tree when the sampler was given ``tree_row``; else ``None``.
        thresholds: S thresholds the rows were held to (``None`` where every pair is kept); ``None`` when
            the sampler does not say (the threshold is then the one it was given).
    """

    pairs: StepPairs
    final_latents: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    choices: torch.Tensor
    judge_calls: int
    unet_calls: int
    judged_steps: list[int]
    tree: SamplingTree | None = None
    thresholds: list[float | None] | None = None


def check_branching_batch(latents: torch.Tensor, prompts: list[str], cond: Conditioning, num_candidates: int) -> tuple[int, int]:
    """The (b, k) of a step-wise sampler's batch, after checking k >= 2 and that prompts, conditioning and
    latents [b, C, h, w] agree on b."""
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2 to form pairs, got {num_candidates}")
    b = latents.shape[0]
    if len(prompts) != b or len(cond) != b:
        raise ValueError(f"{b} latents but {len(prompts)} prompts and {len(cond)} rows of conditioning")
    return b, num_candidates


@torch.no_grad()
def spo_sample(
    unet: UNet2DConditionModel,
    vae,
    scheduler: DDIMScheduler,
    judge: PreferenceModel,
    prompts: list[str],
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    divert_start_step: int = 4,
    num_candidates: int = 4,
    threshold: float = 0.3,
    generator: torch.Generator | None = None,
    decode_chunk_size: int = 8,
    judge_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    tree_row: int | None = None,
) -> SamplingResult:
    """Run SPO's step-wise sampling for one batch of prompts (see the module docstring).

    Args:
        unet, vae, scheduler: the model being trained (in eval mode) and its DDIM scheduler.
        judge: scores decoded x0-predictions, ``score(images [B,3,H,W], prompts, timesteps [B]) -> [B]``.
        prompts: b captions.
        cond: b rows of their conditioning (``family.conditioner(pipe).encode(prompts)``).
        negative: 1 row, the negative prompt's conditioning.
        latents: [b, C, h, w] initial noise x_T (already scaled by ``init_noise_sigma``).
        num_candidates: k, candidates drawn per step (SPO SD1.5: 4).
        threshold: ``select_pair`` threshold (SPO SD1.5: 0.3).
        generator: drives all noise and the choice of the continued candidate.
        decode_chunk_size: latents decoded by the VAE at once (0: sized by free CUDA memory).
        judge_batch_size: images scored by the judge at once (memory bound); all k*b at once when unset.
        progress: called with 1 after each denoising step.
        tree_row: record the sampling tree of this prompt (its index in ``prompts``) in ``result.tree``.
    """
    if not 0 <= divert_start_step < num_inference_steps:
        raise ValueError(f"divert_start_step must be in [0, {num_inference_steps}), got {divert_start_step}")
    return branching_sample(
        unet, vae, scheduler, judge, prompts, cond, negative, latents, ending="spo",
        num_inference_steps=num_inference_steps, eta=eta, guidance_scale=guidance_scale,
        divert_start_step=divert_start_step, num_candidates=num_candidates, threshold=threshold, generator=generator,
        decode_chunk_size=decode_chunk_size, judge_batch_size=judge_batch_size, progress=progress, tree_row=tree_row,
    )


def _score_in_batches(
    judge: PreferenceModel, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, batch_size: int | None
) -> torch.Tensor:
    """``judge.score`` on [B, 3, H, W] images, at most ``batch_size`` at a time (all at once when unset); [B]."""
    if not batch_size or batch_size >= images.shape[0]:
        return judge.score(images, prompts, timesteps)
    parts = [
        judge.score(images[i : i + batch_size], prompts[i : i + batch_size], timesteps[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts)


# How a branching chain ends and what judges it: SPO's SD1.5 sampler, GradSPO's two samplers
# (spotune.diffusion.gradspo_sampler explains theirs), or LPO's (spotune.diffusion.lpo_sampler).
BranchEnding = Literal["spo", "gradspo-sd15", "gradspo-sdxl", "lpo"]
# The timestep LPO's latent judge scores a candidate x_{t-1} at: ``authors``, the t of the step that drew it
# (the LPO code's); ``own``, the candidate's own noise level t-1 (0 after the last step), as SPO's judge does.
LatentJudgeTimestep = Literal["authors", "own"]


def branching_sample(
    unet: UNet2DConditionModel,
    vae,
    scheduler: DDIMScheduler,
    judge: PreferenceModel,
    prompts: list[str],
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    ending: BranchEnding,
    num_inference_steps: int,
    eta: float,
    guidance_scale: float,
    divert_start_step: int,
    num_candidates: int,
    threshold: float,
    generator: torch.Generator | None,
    decode_chunk_size: int,
    judge_batch_size: int | None,
    progress: Callable[[int], None] | None,
    tree_row: int | None = None,
    step_thresholds: torch.Tensor | None = None,
    latent_judge_timestep: LatentJudgeTimestep = "authors",
) -> SamplingResult:
    """The branching loop SPO's and GradSPO's step-wise samplers share (arguments checked by the callers).

    At each step from ``divert_start_step`` on, k candidates are drawn from the shared x_t (mean + s_t z,
    z drawn as :func:`ddim_step_with_logprob` draws it), judged, and the chain continues from a random
    one. ``ending`` says what differs: GradSPO's samplers keep each pair's ``noise_delta`` ((z_win -
    z_lose) / 2) and end the chain their own way (``gradspo-sd15``: the final candidates judged at the
    last step's timestep, every final pair kept; ``gradspo-sdxl``: the t_{N-2} branch's chains each take
    their last step and their x0s are judged at t = 0, no chain continued); SPO judges the final
    candidates at t = 0 and keeps what the threshold keeps. ``lpo``: a latent judge scores the noisy
    candidates themselves (no UNet pass on them, no decode; the next step's UNet runs on the b continued
    chains), at ``latent_judge_timestep``, against ``step_thresholds[i]`` ([N], one per step) rather than
    ``threshold``; the last step is judged like the others. ``tree_row`` records that prompt's tree
    (:mod:`spotune.diffusion.tree`) from the images and scores the loop has anyway (LPO decodes the
    recorded prompt's candidates for the tree alone).
    """
    gradspo = ending.startswith("gradspo")
    last_branch = num_inference_steps - 2 if ending == "gradspo-sdxl" else num_inference_steps - 1
    b, k = check_branching_batch(latents, prompts, cond, num_candidates)
    device = latents.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    x = latents
    noise_pred: torch.Tensor | None = None  # guided output at (x, t_i), when already known
    # Per branching step, every prompt's pair; the decisive ones are picked once after the loop, so no
    # step waits on the device to learn how many pairs it kept.
    steps_x: list[torch.Tensor] = []  # [b, C, h, w] x_{t_i}
    steps_win: list[torch.Tensor] = []  # [b, C, h, w] best candidate
    steps_lose: list[torch.Tensor] = []  # [b, C, h, w] worst candidate
    steps_t: list[torch.Tensor] = []  # [b] t_i
    steps_delta: list[torch.Tensor] = []  # [b, C, h, w] (z_best - z_worst) / 2 (GradSPO)
    all_scores, all_valid, all_choices, judged = [], [], [], []
    thresholds: list[float | None] = []
    judge_calls = unet_calls = 0
    cand_cond = cond.repeat(k)  # k*b rows, candidate-major: row j*b + p
    cand_prompts = list(prompts) * k
    tree = None if tree_row is None else SamplingTree(tree_row, ending)

    for i, t in enumerate(timesteps):
        t_batch = t.expand(b)
        if noise_pred is None:
            noise_pred = guided_noise_pred(unet, x, t_batch, cond, negative, guidance_scale)
            unet_calls += 1
        if i < divert_start_step:
            x, _ = ddim_step_with_logprob(scheduler, noise_pred, t_batch, x, eta, generator=generator)
            noise_pred = None
            if progress:
                progress(1)
            continue

        # Branch: k candidates x_{t_{i+1}} from the shared x_{t_i}, same mean, independent noise z.
        mean, std = ddim_posterior(scheduler, noise_pred.repeat(k, 1, 1, 1), t.expand(k * b), x.repeat(k, 1, 1, 1), eta)
        z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # [k*b, C, h, w]
        cands = (mean + std * z).to(x.dtype)
        last = i == len(timesteps) - 1
        final = ending == "gradspo-sdxl" and i == last_branch
        images = None  # decoded x0-predictions, when the judge needs them
        if ending == "lpo":
            if latent_judge_timestep == "authors":
                judge_t = t.expand(k * b).long()
            else:
                judge_t = previous_timestep(scheduler, t.expand(k * b)).clamp(min=0)
            cand_noise = None
        elif last:
            x0 = cands.float()  # the candidates are final latents
            # GradSPO's SD1.5 sampler judges them at the last step's own timestep; SPO at 0.
            judge_t = t.expand(k * b).long() if ending == "gradspo-sd15" else torch.zeros(k * b, dtype=torch.long, device=device)
            cand_noise = None
        else:
            judge_t = previous_timestep(scheduler, t.expand(k * b))
            cand_noise = guided_noise_pred(unet, cands, judge_t, cand_cond, negative, guidance_scale)
            unet_calls += 1
            if final:
                # No judging at t_{N-1}: each chain takes its own last step (one draw each, in the same
                # [k*b] layout) and the x0s are judged at t = 0.
                ends, _ = ddim_step_with_logprob(scheduler, cand_noise, judge_t, cands, eta, generator=generator)
                x0 = ends.float()
                judge_t = torch.zeros(k * b, dtype=torch.long, device=device)
            else:
                x0, _ = predict_x0_and_eps(scheduler, cand_noise, judge_t, cands)
        if ending == "lpo":
            scores = _score_in_batches(judge, cands, cand_prompts, judge_t, judge_batch_size).float().view(k, b)  # [k, b]
        else:
            images = decode_latents(vae, x0, decode_chunk_size)
            scores = _score_in_batches(judge, images, cand_prompts, judge_t, judge_batch_size).float().view(k, b)  # [k, b]
        judge_calls += 1
        step_threshold = threshold if step_thresholds is None else float(step_thresholds[i])
        indices, valid = select_pair(scores, step_threshold)  # [2, b], [b]
        keep_all = last and ending == "gradspo-sd15"
        if keep_all:
            valid = torch.ones_like(valid)  # every final pair is kept, whatever the threshold
        judged.append(i)
        thresholds.append(None if keep_all else step_threshold)
        if tree is not None:
            if images is None:  # a latent judge: the recorded prompt's candidates are decoded for the tree alone
                images = _tree_images(unet, vae, scheduler, cands.view(k, b, *cands.shape[1:])[:, tree_row], t, last,
                                      cond.select(torch.full((k,), tree_row, device=device)), negative, guidance_scale,
                                      decode_chunk_size)
            tree.judged(i, t, judge_t, images, scores, None if keep_all else step_threshold, valid)

        cands_kb = cands.view(k, b, *cands.shape[1:])  # [k, b, C, h, w]
        rows = torch.arange(b, device=device)
        steps_x.append(x)
        steps_win.append(cands_kb[indices[0], rows])
        steps_lose.append(cands_kb[indices[1], rows])
        steps_t.append(t_batch.long())
        if gradspo:
            z_kb = z.view(k, b, *z.shape[1:])
            steps_delta.append((z_kb[indices[0], rows] - z_kb[indices[1], rows]) / 2)
        all_scores.append(scores)
        all_valid.append(valid)
        if final:
            x = ends  # [k*b, C, h, w]: every chain's x0; no chain is continued
            if progress:
                progress(2)  # this branch and the last step
            break
        # Continue from a uniformly random candidate, and reuse its already computed UNet output.
        choice = torch.randint(0, k, (b,), generator=generator, device=generator.device if generator else "cpu").to(device)
        x = cands_kb[choice, rows]
        noise_pred = None if cand_noise is None else cand_noise.view(k, b, *cand_noise.shape[1:])[choice, rows]
        all_choices.append(choice)
        if tree is not None:
            tree.continued_from(choice)
        if progress:
            progress(1)

    valid_sb = torch.stack(all_valid)  # [S, b]
    step_of, prompt_of = valid_sb.nonzero(as_tuple=True)  # decisive pairs, step-major then prompt order
    flat = step_of * b + prompt_of
    extra = {"noise_delta": torch.cat(steps_delta)[flat]} if gradspo else {}
    pairs = StepPairs(
        latents=torch.cat(steps_x)[flat],
        win=torch.cat(steps_win)[flat],
        lose=torch.cat(steps_lose)[flat],
        timesteps=torch.cat(steps_t)[flat],
        cond=cond.select(prompt_of),
        prompt_index=prompt_of,
        step_index=step_of + divert_start_step,
        **extra,
    )
    return SamplingResult(
        pairs=pairs,
        final_latents=x,
        scores=torch.stack(all_scores),
        valid=valid_sb,
        choices=torch.stack(all_choices) if all_choices else torch.zeros(0, b, dtype=torch.long, device=device),
        judge_calls=judge_calls,
        unet_calls=unet_calls,
        judged_steps=judged,
        tree=tree,
        thresholds=thresholds,
    )


def _tree_images(unet, vae, scheduler: DDIMScheduler, cands: torch.Tensor, t: torch.Tensor, last: bool,
                 cond: Conditioning, negative: Conditioning, guidance_scale: float, decode_chunk_size: int) -> torch.Tensor:
    """[k, 3, H, W] decoded x0-predictions of one prompt's k candidates [k, C, h, w] drawn at step t (the final
    latents themselves after the last step), for a sampling tree whose judge never decodes."""
    if last:
        return decode_latents(vae, cands.float(), decode_chunk_size)
    own_t = previous_timestep(scheduler, t.expand(cands.shape[0]))
    noise = guided_noise_pred(unet, cands, own_t, cond, negative, guidance_scale)
    x0, _ = predict_x0_and_eps(scheduler, noise, own_t, cands)
    return decode_latents(vae, x0, decode_chunk_size)


@torch.no_grad()
def ddim_sample(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    eta: float = 0.0,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    on_x0_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Plain guided DDIM sampling: [b, C, h, w] x_T -> [b, C, h, w] x_0 latents (validation images).

    ``cond`` holds b rows of conditioning, ``negative`` one row. ``on_x0_prediction(t, x0)``, when
    given, sees every step's timestep and [b, C, h, w] x0-prediction latents (what SPO's judge sees).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    x = latents
    for t in scheduler.timesteps:
        noise_pred = guided_noise_pred(unet, x, t.expand(x.shape[0]), cond, negative, guidance_scale)
        out = scheduler.step(noise_pred, t, x, eta=eta, generator=generator)
        if on_x0_prediction is not None:
            on_x0_prediction(int(t), out.pred_original_sample)
        x = out.prev_sample
    return x


@torch.no_grad()
def trajectory_sample(
    unet: UNet2DConditionModel,
    vae,
    scheduler: DDIMScheduler,
    judge: PreferenceModel,
    prompts: list[str],
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    divert_start_step: int = 4,
    threshold: float = 0.3,
    generator: torch.Generator | None = None,
    decode_chunk_size: int = 8,
) -> SamplingResult:
    """The trajectory-level baseline SPO argues against (Diffusion-DPO style), for comparison.

    Two independent chains per prompt; only their *final* images are judged (at t = 0), and that one
    label is propagated to every step i >= ``divert_start_step`` of the two chains: tuple i pairs the
    winner's step (x_{t_i}^w -> x_{t_{i+1}}^w) with the loser's (x_{t_i}^l -> x_{t_{i+1}}^l). The steps
    start from different states, so ``latents_lose`` is set. Same outputs as :func:`spo_sample`, with
    ``scores`` [1, 2, b].

    Args:
        latents: [2*b, C, h, w] initial noise for the two chains (chain j of prompt p at row j*b + p).
        others: as in :func:`spo_sample`.
    """
    b = len(prompts)
    if latents.shape[0] != 2 * b:
        raise ValueError(f"trajectory sampling needs 2 chains per prompt: {2 * b} latents, got {latents.shape[0]}")
    device = latents.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    cond2 = cond.repeat(2)  # 2b rows: chain j of prompt p at row j*b + p
    states = [latents]
    for t in scheduler.timesteps:
        t_batch = t.expand(2 * b)
        out = guided_noise_pred(unet, states[-1], t_batch, cond2, negative, guidance_scale)
        x_next, _ = ddim_step_with_logprob(scheduler, out, t_batch, states[-1], eta, generator=generator)
        states.append(x_next)
    images = decode_latents(vae, states[-1].float(), decode_chunk_size)
    scores = judge.score(images, list(prompts) * 2, torch.zeros(2 * b, dtype=torch.long, device=device))
    scores = scores.float().view(2, b)
    indices, valid = select_pair(scores, threshold)  # [2, b], [b]
    keep = valid.nonzero().squeeze(1)
    chains = torch.stack(states).view(len(states), 2, b, *latents.shape[1:])  # [N+1, 2, b, C, h, w]
    kept = []
    for i in range(divert_start_step, num_inference_steps):
        win_chain, lose_chain = indices[0, keep], indices[1, keep]
        kept.append(
            StepPairs(
                latents=chains[i, win_chain, keep],
                win=chains[i + 1, win_chain, keep],
                lose=chains[i + 1, lose_chain, keep],
                timesteps=scheduler.timesteps[i].expand(keep.numel()).long(),
                cond=cond.select(keep),
                prompt_index=keep,
                step_index=torch.full_like(keep, i),
                latents_lose=chains[i, lose_chain, keep],
            )
        )
    pairs = StepPairs.cat(kept) if keep.numel() else StepPairs.empty_like(latents, cond, trajectory=True)
    return SamplingResult(
        pairs=pairs,
        final_latents=states[-1][:b],
        scores=scores[None],
        valid=valid[None],
        choices=torch.zeros(1, b, dtype=torch.long, device=device),
        judge_calls=1,
        unet_calls=num_inference_steps,
        judged_steps=[num_inference_steps - 1],
    )


def sampling_unet_evaluations(
    sampler: str, num_prompts: int, num_inference_steps: int, divert_start_step: int, num_candidates: int
) -> int:
    """Guided UNet evaluations (latent rows through :func:`guided_noise_pred`) of one sampling round.

    Each guided evaluation is one latent through the UNet with classifier-free guidance (two UNet rows
    when the guidance scale is not 1). With b prompts, N steps, divert step d and k candidates:

    * ``step`` (:func:`spo_sample`, and GradSPO's sampler, which branches the same way): the d + 1
      trunk passes up to and including the first branching step, then k candidates per branching step
      but the last (the chosen candidate's output is reused as the next trunk output; the final
      candidates need none): ``b * (d + 1 + k * (N - d - 1))``;
    * ``trajectory`` (:func:`trajectory_sample`): two full chains per prompt, ``b * 2 * N``;
    * ``lpo`` (LPO's sampler): one pass per chain and step, the k candidates drawn from its one DDIM mean
      and judged as latents by the latent reward model (which :func:`judged_candidates` counts): ``b * N``.

    That is ``unet_calls`` of :class:`SamplingResult` weighted by each pass's batch size; the methods'
    sampling costs differ by this much (SD1.5 defaults, b = 1: 65 against 40).
    """
    n, d, k = num_inference_steps, divert_start_step, num_candidates
    if sampler == "step":
        if not 0 <= d < n:
            raise ValueError(f"divert_start_step must lie in [0, {n}), got {d}")
        return num_prompts * (d + 1 + k * (n - d - 1))
    if sampler == "trajectory":
        return num_prompts * 2 * n
    if sampler == "lpo":
        return num_prompts * n
    raise ValueError(f"unknown sampler {sampler!r} (step, trajectory or lpo)")


def judged_candidates(
    sampler: str, num_prompts: int, num_inference_steps: int, divert_start_step: int, num_candidates: int
) -> int:
    """Candidates the judge scores in one sampling round (arguments as :func:`sampling_unet_evaluations`).

    ``step``: k per chain at each of the N - d branching steps, each x0-prediction decoded by the VAE and
    scored by a pixel judge; ``lpo``: k per chain at each of the N - d steps, scored as latents by the LRM
    (two half-UNet rows each: the prompt's and the empty prompt's); ``trajectory``: the 2 final images per prompt.
    """
    n, d, k = num_inference_steps, divert_start_step, num_candidates
    if sampler in ("step", "lpo"):
        return num_prompts * k * (n - d)
    if sampler == "trajectory":
        return num_prompts * 2
    raise ValueError(f"unknown sampler {sampler!r} (step, trajectory or lpo)")
