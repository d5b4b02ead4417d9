"""The MAGRAL selection controller: a parameter-shared LSTM over the pool, a two-layer MLP score per image.

Two variants with one interface (`sample` for training rollouts, `scores`/`select` for inference):

- `SequentialController` ("sequential"): an `nn.LSTMCell` stepped over the pool; each step's input is the
  image's embedded features concatenated with the previous decision (1 = selected). Decisions are
  Bernoulli(σ(score)) with forcing so that every rollout selects exactly `budget` images: once `budget` are
  chosen the rest are skipped, and when the images left equal the budget left they are all selected. The
  log-probability sums over the unforced steps only.
- `GumbelController` ("gumbel"): one fused `nn.LSTM` pass gives every image a score; a batch is the top
  `budget` of score + Gumbel noise, i.e. an ordered Plackett–Luce sample without replacement, whose
  log-probability is Σⱼ [s₍ⱼ₎ − log Σ_{not yet chosen} exp s]. A fused pass cannot see decisions, so each
  step sees its own features and, through the LSTM state, the images before it in this episode's order
  (the pool context); the interaction between the chosen images is carried by the sampling without
  replacement instead of by feedback.

Both shuffle the pool order per episode, so a position cannot be exploited ("gumbel" by default shares one
order among the rollouts of one update: one LSTM pass, see `ControllerConfig.shared_order`), and embed the
features with one shared linear layer first so memory per rollout is N × `embed`, not N × F.
Inference is deterministic: the mean score over `inference_orders` fixed orders (the identity first, then
permutations from a fixed seed); the top-`budget` scores are the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

VARIANTS = ("gumbel", "sequential")


@dataclass(frozen=True)
class ControllerConfig:
    """Constructor arguments of a controller (saved with its state dict)."""

    in_features: int
    """F: length of each image's feature vector."""
    variant: str = "gumbel"
    """"gumbel" (fused LSTM + Gumbel-top-B, the default: same learning, much faster) or "sequential"."""
    embed: int = 32
    """Width of the shared input embedding."""
    hidden: int = 64
    """LSTM hidden size and MLP width."""
    inference_orders: int = 8
    """Fixed pool orders averaged for the deterministic inference score."""
    shared_order: bool = True
    """Gumbel variant: the rollouts of one `sample` call share one shuffled order, hence one LSTM pass,
    and differ by their Gumbel noise (the LSTM pass is nearly all the cost). The estimate stays unbiased:
    every call draws a fresh order. The sequential variant always gives each rollout its own order."""


class Rollout(NamedTuple):
    """`rollouts` sampled batches: `selected` (R, B) pool indices in selection order, `log_prob` (R,) with
    gradient, `entropy` (R,) with gradient: for "gumbel" the entropy of the first pick's softmax over the
    pool, for "sequential" the mean Bernoulli entropy per pool image (forced steps count 0)."""

    selected: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor


def _check(features: torch.Tensor, budget: int) -> None:
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"expected features of shape (N, F) with N >= 1, found {tuple(features.shape)}")
    if not 1 <= budget <= len(features):
        raise ValueError(f"budget must be within [1, N={len(features)}], found {budget}")


def _permutations(rollouts: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(rollouts)])  # (R, N)


class Controller(nn.Module):
    """Shared parts: input embedding, MLP score head, deterministic inference."""

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__()
        if config.variant not in VARIANTS:
            raise ValueError(f"unknown controller variant {config.variant!r}; expected one of {VARIANTS}")
        self.config = config
        self.embed = nn.Linear(config.in_features, config.embed)
        self.head = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.Tanh(), nn.Linear(config.hidden, 1)
        )

    def sample(
        self,
        features: torch.Tensor,
        budget: int,
        rollouts: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Rollout:
        raise NotImplementedError

    def ordered_scores(self, features: torch.Tensor, order: torch.Tensor, budget: int) -> torch.Tensor:
        """(N,) scores of the images when visited in `order`, indexed by pool position."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, features: torch.Tensor | np.ndarray, budget: int) -> np.ndarray:
        """Deterministic (N,) selection scores: the mean over `inference_orders` fixed orders."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        _check(x, budget)
        gen = torch.Generator().manual_seed(0)
        total = torch.zeros(len(x))
        for k in range(max(1, self.config.inference_orders)):
            order = torch.arange(len(x)) if k == 0 else torch.randperm(len(x), generator=gen)
            total += self.ordered_scores(x, order, budget)
        return (total / max(1, self.config.inference_orders)).numpy().astype(np.float64)

    def select(self, features: torch.Tensor | np.ndarray, budget: int) -> np.ndarray:
        """The deterministic batch: indices of the top-`budget` scores, best first."""
        s = self.scores(features, budget)
        return np.argsort(-s, kind="stable")[:budget]

    def describe(self) -> dict[str, object]:
        """Constructor arguments, for a self-describing checkpoint."""
        return asdict(self.config)


class GumbelController(Controller):
    """Fused LSTM scores + Gumbel-top-B (Plackett–Luce) sampling; see module docstring."""

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__(config)
        self.lstm = nn.LSTM(config.embed, config.hidden, batch_first=True)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(z)  # (R, N, H)
        return self.head(out).squeeze(-1)  # (R, N)

    def sample(
        self,
        features: torch.Tensor,
        budget: int,
        rollouts: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Rollout:
        _check(features, budget)
        n = len(features)
        perm = _permutations(1 if self.config.shared_order else rollouts, n, generator)  # (O, N)
        s = self._scores(self.embed(features)[perm]) / temperature  # (O, N), in permuted positions
        perm, s = perm.expand(rollouts, n), s.expand(rollouts, n)  # (R, N)
        u = torch.rand(s.shape, generator=generator).clamp_(1e-12, 1.0 - 1e-7)
        keys = s.detach() - torch.log(-torch.log(u))
        top = torch.topk(keys, budget, dim=1).indices  # (R, B) ordered sample, permuted positions
        log_prob = plackett_luce_log_prob(s, top)
        q = F.log_softmax(s, dim=1)
        entropy = -(q.exp() * q).sum(1)  # entropy of the first pick
        return Rollout(perm.gather(1, top), log_prob, entropy)

    def ordered_scores(self, features: torch.Tensor, order: torch.Tensor, budget: int) -> torch.Tensor:
        s = self._scores(self.embed(features)[order][None])[0]  # (N,) in visiting order
        out = torch.empty_like(s)
        out[order] = s
        return out


def plackett_luce_log_prob(scores: torch.Tensor, ordered: torch.Tensor) -> torch.Tensor:
    """log P of drawing `ordered` (R, B) in that order without replacement, P ∝ exp(scores) (R, N).

    Computed in float64 with the running mass of the images not yet drawn: Σⱼ sⱼ − log(Z − Σ_{i<j} e^{sᵢ}).
    """
    s = scores.double()
    m = s.max(dim=1, keepdim=True).values.detach()
    e = (s - m).exp()  # (R, N)
    total = e.sum(1, keepdim=True)  # (R, 1)
    chosen = e.gather(1, ordered)  # (R, B)
    before = chosen.cumsum(1) - chosen
    denom = torch.log((total - before).clamp_min(1e-300)) + m
    return (s.gather(1, ordered) - denom).sum(1).float()


class SequentialController(Controller):
    """LSTMCell stepped over the pool with the previous decision fed back; see module docstring."""

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__(config)
        self.cell = nn.LSTMCell(config.embed + 1, config.hidden)

    def _run(
        self,
        z: torch.Tensor,
        budget: int,
        *,
        generator: torch.Generator | None,
        temperature: float,
        greedy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step over z (R, N, E).

        Returns decisions (R, N) bool, logits (R, N), log_prob (R,), entropy (R,).
        """
        r, n, _ = z.shape
        h = z.new_zeros(r, self.config.hidden)
        c = z.new_zeros(r, self.config.hidden)
        prev = z.new_zeros(r, 1)
        chosen = torch.zeros(r, dtype=torch.long)
        log_prob = z.new_zeros(r)
        entropy = z.new_zeros(r)
        decisions = torch.zeros(r, n, dtype=torch.bool)
        logits = []
        u = torch.rand(r, n, generator=generator)
        for k in range(n):
            h, c = self.cell(torch.cat([z[:, k], prev], 1), (h, c))
            logit = self.head(h).squeeze(-1) / temperature  # (R,)
            logits.append(logit)
            left = budget - chosen
            force_on = left >= n - k
            force_off = left <= 0
            p = torch.sigmoid(logit.detach())
            a = (p >= 0.5) if greedy else (u[:, k] < p)
            a = torch.where(force_on, True, torch.where(force_off, False, a))
            free = (~force_on & ~force_off).float()
            af = a.float()
            log_prob = log_prob + free * (af * F.logsigmoid(logit) + (1 - af) * F.logsigmoid(-logit))
            q = torch.sigmoid(logit)
            entropy = entropy + free * -(q * F.logsigmoid(logit) + (1 - q) * F.logsigmoid(-logit))
            decisions[:, k] = a
            chosen = chosen + a.long()
            prev = af[:, None]
        return decisions, torch.stack(logits, 1), log_prob, entropy

    def sample(
        self,
        features: torch.Tensor,
        budget: int,
        rollouts: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Rollout:
        _check(features, budget)
        perm = _permutations(rollouts, len(features), generator)  # (R, N)
        z = self.embed(features)[perm]  # (R, N, E)
        decisions, _, log_prob, entropy = self._run(
            z, budget, generator=generator, temperature=temperature, greedy=False
        )
        positions = decisions.nonzero()[:, 1].reshape(rollouts, budget)  # exactly B per row, by construction
        return Rollout(perm.gather(1, positions), log_prob, entropy / len(features))

    def ordered_scores(self, features: torch.Tensor, order: torch.Tensor, budget: int) -> torch.Tensor:
        z = self.embed(features)[order][None]
        _, logits, _, _ = self._run(z, budget, generator=None, temperature=1.0, greedy=True)
        out = torch.empty(len(order))
        out[order] = logits[0]
        return out


def build_controller(config: ControllerConfig, *, seed: int = 0) -> Controller:
    """A freshly initialised controller; `seed` fixes the initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.variant == "sequential":
            return SequentialController(config)
        if config.variant == "gumbel":
            return GumbelController(config)
    raise ValueError(f"unknown controller variant {config.variant!r}; expected one of {VARIANTS}")


def save_state(controller: Controller) -> dict[str, object]:
    """A self-describing, `torch.load(weights_only=True)`-safe checkpoint dict."""
    return {"config": controller.describe(), "state_dict": controller.state_dict()}


def load_state(state: dict[str, object]) -> Controller:
    """Rebuild a controller from `save_state`'s dict."""
    config = ControllerConfig(**state["config"])  # type: ignore[arg-type]
    controller = build_controller(config)
    controller.load_state_dict(state["state_dict"])  # type: ignore[arg-type]
    return controller.eval()
