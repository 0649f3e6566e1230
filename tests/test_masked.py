"""Masked discrete diffusion: schedules, the ELBO, samplers, prompt CFG, text data and metrics."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffbench.denoiser import MaskedDenoiser
from diffbench.metrics import MetricContext
from diffbench.registry import Incompatible
from diffbench.rng import SampleGenerators
from diffbench_plugins import masked_guidance, masked_samplers, mdlm, text_data, text_metrics

SAMPLERS = {
    "mdlm-ancestral": masked_samplers.sample_mdlm_ancestral,
    "llada-lowconf": masked_samplers.sample_llada_lowconf,
    "llada-random": masked_samplers.sample_llada_random,
}


class OneStream:
    """A single-generator stand-in for SampleGenerators (fast for tens of thousands of samples)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, shape, dtype=torch.float32):
        return torch.rand(self.n, *shape, generator=self.g, dtype=dtype)

    def rand_like(self, x):
        return torch.rand(x.shape, generator=self.g, dtype=x.dtype)


class TableNet(torch.nn.Module):
    """A time-independent model over vocab V and length 2: one row of logits per input state."""

    def __init__(self, vocab=3, seed=0):
        super().__init__()
        self.vocab = vocab
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", 2 * torch.randn((vocab + 1) ** 2, 2, vocab, generator=g))

    def forward(self, tokens, t, cond=None):
        return self.table[tokens[:, 0] * (self.vocab + 1) + tokens[:, 1]]  # [B, 2, V]


def table_denoiser(schedule="linear", vocab=3):
    return MaskedDenoiser(TableNet(vocab), vocab_size=vocab, mask_id=vocab, schedule=mdlm.make_schedule(schedule))


def transformer_denoiser(vocab=5, prompt=None, seed=0):
    torch.manual_seed(seed)
    net = mdlm.MaskedTransformer(vocab, hidden=32, depth=1, heads=2).eval()
    return MaskedDenoiser(net, vocab_size=vocab, mask_id=vocab, schedule=mdlm.make_schedule("linear"), prompt=prompt)


# ----------------------------------------------------------------------------------------------
# Forward process and ELBO


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mask_rate_matches_schedule_marginal(schedule):
    sched = mdlm.make_schedule(schedule)
    x0 = torch.randint(0, 7, (4000, 50), generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.5, 0.9):
        u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1))
        x_t, masked = mdlm.mask_tokens(x0, torch.full((len(x0),), t), sched, 7, u)
        p = 1 - float(sched.alpha(torch.tensor(t, dtype=torch.float64)))
        se = math.sqrt(p * (1 - p) / x0.numel())
        assert abs(masked.double().mean().item() - p) < 4 * se
        assert torch.equal(x_t[~masked], x0[~masked]) and (x_t[masked] == 7).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    sched = mdlm.make_schedule(schedule)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    d_alpha = (torch.as_tensor(sched.alpha(t + h)) - torch.as_tensor(sched.alpha(t - h))) / (2 * h)
    expected = -d_alpha / (1 - torch.as_tensor(sched.alpha(t)))
    torch.testing.assert_close(torch.as_tensor(sched.weight(t), dtype=torch.float64), expected, rtol=1e-6, atol=0)


def _conditional_nll(D, x, masked):
    """−log p_θ(x_i | x with positions `masked` hidden), [2] for a length-2 sequence."""
    x_t = torch.tensor([[D.mask_id if m else v for v, m in zip(x, masked)]])
    return -D(x_t, 0.5).log_softmax(-1)[0, torch.arange(2), torch.tensor(x)]


def exact_nll(D, x):
    """The continuous-time model's exact −log p(x): tokens are revealed one at a time in a uniformly
    random order (equal rates), each drawn from p_θ(· | current x_t) (Ou et al. 2024, RADD)."""
    both = _conditional_nll(D, x, (True, True))
    second_given_first = _conditional_nll(D, x, (False, True))[1]
    first_given_second = _conditional_nll(D, x, (True, False))[0]
    log_p = torch.logaddexp(-both[0] - second_given_first, -both[1] - first_given_second) - math.log(2)
    return float(-log_p)


def elbo_by_quadrature(D, x, t_min=0.0):
    """(1/(1−t_min)) ∫_{t_min}^1 w(t) E_{x_t|x}[Σ_masked −log p_θ(x_i | x_t)] dt, enumerating the masks."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = torch.tensor(t_min + (1 - t_min) * (nodes + 1) / 2, dtype=torch.float64)
    quad = torch.tensor(weights, dtype=torch.float64) * (1 - t_min) / 2
    a, w = torch.as_tensor(D.schedule.alpha(t)), torch.as_tensor(D.schedule.weight(t))
    total = 0.0
    for masked in itertools.product((False, True), repeat=2):
        k = sum(masked)
        if k:
            prob = (1 - a) ** k * a ** (2 - k)  # q(this mask pattern | t)
            nll = float(_conditional_nll(D, x, masked)[list(masked)].sum())
            total += float((quad * w * prob).sum()) * nll
    return total / (1 - t_min)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_exact_nll_is_bounded_by_the_continuous_time_elbo(schedule):
    D = table_denoiser(schedule)
    seqs = list(itertools.product(range(3), repeat=2))
    with torch.no_grad():
        nll = [exact_nll(D, x) for x in seqs]
        elbo = [elbo_by_quadrature(D, x) for x in seqs]
    assert sum(math.exp(-v) for v in nll) == pytest.approx(1.0, abs=1e-6)  # a normalised likelihood (float32 logits)
    for v, bound in zip(nll, elbo):
        assert v <= bound + 1e-6
    assert max(b - v for v, b in zip(nll, elbo)) > 1e-3  # the bound is not tight for this model
    # With a time-independent model the ELBO is the same for every schedule (MDLM §3.2): for
    # k masked tokens ∫ w (1−α)^k α^(L−k) dt = B(k, L−k+1) = (k−1)!(L−k)!/L!.
    x = seqs[5]
    closed_form = sum(math.factorial(sum(m) - 1) * math.factorial(2 - sum(m)) / 2
                      * float(_conditional_nll(D, x, m)[list(m)].sum())
                      for m in [(True, False), (False, True), (True, True)])
    assert elbo[5] == pytest.approx(closed_form, rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_training_loss_is_an_unbiased_estimate_of_the_elbo(schedule):
    D = table_denoiser(schedule)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=2)))  # [9, 2]
    x0 = seqs.repeat(20000, 1)  # [180000, 2]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t = mdlm.low_discrepancy_times(len(x0), g, "cpu")
        terms = mdlm.masked_elbo_terms(D, x0, t, torch.rand(x0.shape, generator=g)).double()
        target = np.mean([elbo_by_quadrature(D, x.tolist(), mdlm.T_MIN) for x in seqs])
        full = np.mean([elbo_by_quadrature(D, x.tolist()) for x in seqs])
    se = terms.std().item() / math.sqrt(len(terms))
    assert abs(terms.mean().item() - target) < 4 * se
    assert abs(full - target) < 0.01  # truncating t at T_MIN costs little
    # elbo-ppl's estimator: deterministic for a seed, and on target
    e1 = text_metrics.elbo_per_token(D, seqs, draws=4000, seed=3)
    assert e1 == text_metrics.elbo_per_token(D, seqs, draws=4000, seed=3)
    assert abs(2 * e1 - target) < 4 * se * math.sqrt(len(terms) / (4000 * 9))


# ----------------------------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize("name,options", [("mdlm-ancestral", {}), ("llada-lowconf", {}), ("llada-random", {}),
                                          ("llada-lowconf", {"block_length": 4})])
def test_samplers_never_change_unmasked_or_prompt_tokens(name, options):
    prompt = torch.tensor([1, 2, 3])
    D = transformer_denoiser(prompt=prompt)
    B, L = 6, 12
    x = torch.full((B, L), D.mask_id)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    fixed[:, [5, 9]] = True
    x[fixed] = 4  # already unmasked before sampling starts
    history = []
    out = SAMPLERS[name](D, x, torch.linspace(1, 0, 7, dtype=torch.float64),
                         generator=SampleGenerators(0, range(B)), callback=lambda d: history.append(d["x"]), **options)
    assert D.nfe == 6 and len(history) == 6
    assert (out != D.mask_id).all() and (out < D.vocab_size).all()
    assert (out[:, :3] == prompt).all() and (out[fixed] == 4).all()
    for before, after in zip(history, history[1:]):
        revealed = before != D.mask_id
        assert torch.equal(after[revealed], before[revealed])


@pytest.mark.parametrize("block_length", [0, 4])
def test_lowconf_with_steps_equal_to_length_reveals_one_token_per_step(block_length):
    D = transformer_denoiser()
    x = torch.full((3, 12), D.mask_id)
    counts = []
    masked_samplers.sample_llada_lowconf(D, x, torch.linspace(1, 0, 13, dtype=torch.float64),
                                         generator=SampleGenerators(0, range(3)), block_length=block_length,
                                         callback=lambda d: counts.append((d["x"] != D.mask_id).sum(1)))
    assert torch.equal(torch.stack(counts), torch.arange(1, 13)[:, None].expand(12, 3))


def test_block_decoding_fills_blocks_left_to_right():
    D = transformer_denoiser()
    states = []
    masked_samplers.sample_llada_lowconf(D, torch.full((2, 12), D.mask_id), torch.linspace(1, 0, 7, dtype=torch.float64),
                                         generator=SampleGenerators(0, range(2)), block_length=4,
                                         callback=lambda d: states.append(d["x"] != D.mask_id))
    # 6 steps over 3 blocks: two rounds per block; after rounds 2, 4, 6 the first 4, 8, 12 are done
    for rounds, done in ((2, 4), (4, 8), (6, 12)):
        assert states[rounds - 1][:, :done].all() and not states[rounds - 1][:, done:].any()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_does_not_depend_on_batch(name):
    D = transformer_denoiser()
    ts = torch.linspace(1, 0, 5, dtype=torch.float64)
    big = SAMPLERS[name](D, torch.full((4, 12), D.mask_id), ts, generator=SampleGenerators(7, range(4)))
    small = SAMPLERS[name](D, torch.full((2, 12), D.mask_id), ts, generator=SampleGenerators(7, [2, 3]))
    assert torch.equal(big[2:], small)


def ancestral_distribution(D, timesteps):
    """Exact law of MDLM ancestral sampling for length 2, by propagating the distribution over the
    (V+1)² partially masked states through each step's transition matrix."""
    V, M = D.vocab_size, D.mask_id
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=2)))  # [(V+1)², 2]
    with torch.no_grad():
        probs = D(states, 0.5).double().softmax(-1)  # [(V+1)², 2, V] (time-independent model)
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[M * (V + 1) + M] = 1.0
    for t, s in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
        a_t, a_s = (float(D.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        r = (a_s - a_t) / (1 - a_t)  # probability that a masked token is revealed in this step
        step = torch.zeros(len(states), V + 1, V + 1, dtype=torch.float64)  # [state, next a, next b]
        for i, (a, b) in enumerate(states.tolist()):
            pa = torch.cat([r * probs[i, 0], torch.tensor([1 - r], dtype=torch.float64)]) if a == M else torch.eye(V + 1)[a].double()
            pb = torch.cat([r * probs[i, 1], torch.tensor([1 - r], dtype=torch.float64)]) if b == M else torch.eye(V + 1)[b].double()
            step[i] = pa[:, None] * pb[None, :]
        dist = dist @ step.reshape(len(states), -1)
    return dist.reshape(V + 1, V + 1)[:V, :V].flatten()  # [V²]: all tokens revealed at t = 0


def test_ancestral_sampler_matches_its_exact_law_and_the_continuous_model():
    D = table_denoiser()
    seqs = list(itertools.product(range(3), repeat=2))
    # Sampling with 8 steps follows the exact 8-step law ...
    gen = OneStream(0)
    gen.n = 40000
    timesteps = torch.linspace(1, 0, 9, dtype=torch.float64)
    with torch.no_grad():
        out = masked_samplers.sample_mdlm_ancestral(D, torch.full((gen.n, 2), D.mask_id), timesteps, generator=gen)
    freq = torch.bincount(out[:, 0] * 3 + out[:, 1], minlength=9).double() / gen.n
    law = ancestral_distribution(D, timesteps)
    assert law.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert ((freq - law).abs() < 4 * (law * (1 - law) / gen.n).sqrt() + 1e-4).all()
    # ... and with many steps that law converges to the continuous-time model's p(x).
    with torch.no_grad():
        p = torch.tensor([math.exp(-exact_nll(D, x)) for x in seqs], dtype=torch.float64)
    err8 = (law - p).abs().max().item()
    err512 = (ancestral_distribution(D, torch.linspace(1, 0, 513, dtype=torch.float64)) - p).abs().max().item()
    assert err512 < 2e-3 and err512 < err8 / 20


# ----------------------------------------------------------------------------------------------
# Prompt CFG


def test_prompt_cfg_scale_zero_is_no_guidance_and_minus_one_is_unconditional():
    prompt = torch.tensor([0, 1, 2, 3])
    D = transformer_denoiser(prompt=prompt)
    x = masked_samplers.with_prompt(D, torch.full((3, 12), D.mask_id))
    x[:, 6] = 2
    with torch.no_grad():
        plain = D(x, 0.7)
        unprompted = x.clone()
        unprompted[:, :4] = D.mask_id
        uncond = D(unprompted, 0.7)
        torch.testing.assert_close(masked_guidance.apply_prompt_cfg(D, 0.0)(x, 0.7), plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(masked_guidance.apply_prompt_cfg(D, -1.0)(x, 0.7), uncond, rtol=0, atol=1e-5)
        guided = masked_guidance.apply_prompt_cfg(D, 2.0)
        nfe = D.nfe
        assert not torch.allclose(guided(x, 0.7), plain, atol=1e-3)
    assert D.nfe - nfe == 2 and guided.nfe == D.nfe  # two model calls, counted on the shared counter
    with pytest.raises(Incompatible):
        masked_guidance.apply_prompt_cfg(transformer_denoiser(), 1.0)



@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_keep_the_prompt_under_prompt_cfg(name):
    prompt = torch.tensor([4, 0, 4])
    D = transformer_denoiser(prompt=prompt)
    guided = masked_guidance.apply_prompt_cfg(D, 1.5)
    out = SAMPLERS[name](guided, torch.full((3, 12), D.mask_id), torch.linspace(1, 0, 5, dtype=torch.float64),
                         generator=SampleGenerators(0, range(3)))
    assert (out[:, :3] == prompt).all() and (out != D.mask_id).all()
    assert D.nfe == 8  # 4 rounds × (conditional + unconditional call)

# ----------------------------------------------------------------------------------------------
# Data and metrics


def _ctx(dataset, denoiser=None):
    return MetricContext(dataset=dataset, reference=dataset.reference(512)[0], reference_labels=None, labels=None,
                         denoiser=denoiser, device=torch.device("cpu"), seed=0)


def test_markov_text_likelihood_is_normalised():
    ds = text_data.load_markov_text(vocab=5, seq_len=3, branching=2, smoothing=0.01, seed=1)
    all_seqs = torch.tensor(list(itertools.product(range(5), repeat=3)))
    assert ds.log_prob(all_seqs).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(ds.info["transition"].sum(1), torch.ones(5, dtype=torch.float64))


def test_gen_nll_of_true_source_samples_is_its_entropy():
    ds = text_data.load_markov_text(**text_data.MARKOV_DEFAULTS)
    x, _ = ds.draw(8000, torch.Generator().manual_seed(3))
    per_seq = ds.info["nll"](x)
    result = text_metrics.compute_gen_nll(x, _ctx(ds))
    assert abs(result["gen-nll"] - ds.info["entropy_per_token"]) < 4 * per_seq.std().item() / math.sqrt(len(x))
    assert result["off-chain"] < 0.02  # only the smoothing's mass falls off the sparse support


def test_entropy_and_distinct_n_exact_values():
    x = torch.tensor([[0, 1, 0, 1], [2, 2, 2, 2]])
    assert text_metrics.unigram_entropy(x) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    # bigrams: (0,1) (1,0) (0,1) (2,2) (2,2) (2,2): 3 distinct of 6
    assert text_metrics.distinct_n(x, 2) == pytest.approx(0.5)
    assert text_metrics.distinct_n(x, 1) == pytest.approx(3 / 8)


def test_gen_nll_is_incompatible_without_a_known_source(tmp_path):
    (tmp_path / "a.txt").write_text("Hello, World!  " * 20)
    ds = text_data.load_char_text(seq_len=8, paths=str(tmp_path))
    assert ds.info["decode"](ds.examples[0]) == "hello, w"
    assert ds.info["decode"](ds.info["encode"]("abc 123")) == "abc 123"
    with pytest.raises(Incompatible):
        text_metrics.compute_gen_nll(ds.examples, _ctx(ds))


# ----------------------------------------------------------------------------------------------
# Shipped checkpoints


def test_shipped_markov_checkpoint_generates_near_the_source_entropy():
    ds = text_data.load_markov_text(**text_data.MARKOV_DEFAULTS)
    D = mdlm.load_mdlm(ds)
    out = masked_samplers.sample_mdlm_ancestral(D, torch.full((128, 32), D.mask_id),
                                                torch.linspace(1, 0, 33, dtype=torch.float64),
                                                generator=SampleGenerators(0, range(128)))
    floor = ds.info["entropy_per_token"]
    # uniform would be log 16 = 2.77; a model that learned only the unigram marginals had ELBO ≈ 2.2
    assert text_metrics.compute_gen_nll(out, _ctx(ds))["gen-nll"] < floor + 0.4
    elbo = text_metrics.compute_elbo_ppl(out, _ctx(ds, D), sequences=128, draws=4)
    assert floor < elbo["elbo-nll"] < floor + 0.25  # an upper bound on NLL, close to the source entropy


def test_shipped_char_checkpoint_loads_and_keeps_a_prompt():
    ds = text_data.load_char_text(**text_data.CHAR_DEFAULTS)
    D = mdlm.load_mdlm(ds, prompt="the ")
    out = masked_samplers.sample_llada_lowconf(D, torch.full((2, 64), D.mask_id),
                                               torch.linspace(1, 0, 17, dtype=torch.float64),
                                               generator=SampleGenerators(0, range(2)), block_length=16)
    assert all(ds.info["decode"](row).startswith("the ") for row in out)
    with pytest.raises(Incompatible):
        mdlm.load_mdlm(text_data.load_markov_text(**{**text_data.MARKOV_DEFAULTS, "seed": 1}))
