"""The accuracy study's configurations: each variant's manifest overrides, the gated presets and
which variants each table runs (``bench.accuracy`` runs them)."""

from __future__ import annotations


def _gapsl(space: str, mode: str, lam: float, beta: float = 0.9, rho: float = 0.5) -> list[str]:
    return [
        "training.algorithm=gapsl", f"gapsl.space={space}", f"gapsl.gda_mode={mode}",
        f"gapsl.gda_lambda={lam}", f"gapsl.ema_beta={beta}", f"gapsl.rho={rho}",
        "gapsl.prior_tau=0",  # explicit: every variant means the same whatever the defaults
    ]  # fmt: skip


# name -> manifest overrides. GAPSL variants use the prototype's LGI knobs unless they say so.
VARIANTS: dict[str, list[str]] = {
    "psl": ["training.algorithm=psl"],
    "sfl": ["training.algorithm=sfl", "sfl.avg_every=1"],
    "epsl": ["training.algorithm=epsl", "epsl.phi=0.5"],
    "central": ["training.algorithm=central"],
    "gapsl-client-fo": _gapsl("client", "first_order", 1.0),
    "gapsl-client-fo-l05": _gapsl("client", "first_order", 0.5),
    "gapsl-client-exact": _gapsl("client", "exact", 0.1),
    "gapsl-server-exact": _gapsl("server", "exact", 0.1),
    "gapsl-server-fo": _gapsl("server", "first_order", 0.5),
    "gapsl-cut-fo": _gapsl("cut", "first_order", 0.5),
    "client-fedsgd": _gapsl("client", "pull", 1.0),
    # ablations of the client-space first-order default
    "abl-lgi-off": _gapsl("client", "first_order", 1.0, rho=1.0),
    "abl-no-ema": _gapsl("client", "first_order", 1.0, beta=0.0),
    "abl-l025": _gapsl("client", "first_order", 0.25),
    "abl-pull-l05": _gapsl("client", "pull", 0.5),
    # the same, every learning rate annealed (cosine) over the rounds
    "psl-cos": ["training.algorithm=psl", "training.lr_decay=cosine"],
    "sfl-cos": ["training.algorithm=sfl", "sfl.avg_every=1", "training.lr_decay=cosine"],
    "gapsl-client-fo-cos": [*_gapsl("client", "first_order", 1.0), "training.lr_decay=cosine"],
    # every client partition pulled towards the shared initial weights (L2, coefficient 0.01)
    "psl-anchor": ["training.algorithm=psl", "training.client_anchor=0.01"],
    "gapsl-client-fo-anchor": [*_gapsl("client", "first_order", 1.0), "training.client_anchor=0.01"],
    "psl-anchor-01": ["training.algorithm=psl", "training.client_anchor=0.1"],
    "gapsl-client-fo-anchor-01": [*_gapsl("client", "first_order", 1.0), "training.client_anchor=0.1"],
    # the devices' step size: frozen client partitions (the drift control) and a tenth of lr
    "psl-frozen": ["training.algorithm=psl", "training.client_lr_scale=0"],
    "psl-lr01": ["training.algorithm=psl", "training.client_lr_scale=0.1"],
    "sfl-lr01": ["training.algorithm=sfl", "sfl.avg_every=1", "training.client_lr_scale=0.1"],
    "gapsl-client-fo-lr01": [*_gapsl("client", "first_order", 1.0), "training.client_lr_scale=0.1"],
    # the leader built from the devices' momentum updates instead of their raw gradients
    "gapsl-client-fo-upd": [*_gapsl("client", "first_order", 1.0), "gapsl.leader=update"],
    "gapsl-client-fo-upd-lr01": [*_gapsl("client", "first_order", 1.0), "gapsl.leader=update",
                                 "training.client_lr_scale=0.1"],
    # the ceiling with its client layers frozen: the gate of a setup, pooled
    "central-frozen": ["training.algorithm=central", "training.client_lr_scale=0"],
    # tracking GDA: g_i + lam (g_L - r_i), r_i the EMA (track_beta) of the device's own gradient
    "gapsl-track": _gapsl("client", "tracking", 1.0),
    "gapsl-track-l05": _gapsl("client", "tracking", 0.5),
    "gapsl-track-b05": [*_gapsl("client", "tracking", 1.0), "gapsl.track_beta=0.5"],
    "gapsl-track-b09": [*_gapsl("client", "tracking", 1.0), "gapsl.track_beta=0.9"],
    # label-prior-corrected activation gradients, alone (no GDA) and with tracking
    "gapsl-prior": [*_gapsl("client", "first_order", 0.0), "gapsl.prior_tau=1"],
    "gapsl-track-prior": [*_gapsl("client", "tracking", 1.0), "gapsl.prior_tau=1"],
    "gapsl-track-prior05": [*_gapsl("client", "tracking", 1.0), "gapsl.prior_tau=0.5"],
    # tracking against the plain mean of this round's gradients: LGI's selection and EMA off
    "abl-track-lgi-off": _gapsl("client", "tracking", 1.0, beta=0.0, rho=1.0),
    # the leader-trajectory anchor: mu/2 |theta_i - theta_bar|^2, theta_bar the replayed leaders
    "gapsl-anchor": _gapsl("client", "anchor", 1.0),
    "gapsl-anchor-m01": _gapsl("client", "anchor", 0.1),
    "gapsl-anchor-m3": _gapsl("client", "anchor", 3.0),
    "gapsl-anchor-prior": [*_gapsl("client", "anchor", 1.0), "gapsl.prior_tau=1"],
    "abl-track-prior-lgi-off": [*_gapsl("client", "tracking", 1.0, beta=0.0, rho=1.0),
                                "gapsl.prior_tau=1"],
    # which half of LGI costs: its selection (rho 0.5, no EMA) or its smoothing (everyone, EMA)
    "abl-track-prior-no-ema": [*_gapsl("client", "tracking", 1.0, beta=0.0), "gapsl.prior_tau=1"],
    "abl-track-prior-all": [*_gapsl("client", "tracking", 1.0, rho=1.0), "gapsl.prior_tau=1"],
    "abl-anchor-prior-lgi-off": [*_gapsl("client", "anchor", 1.0, beta=0.0, rho=1.0),
                                 "gapsl.prior_tau=1"],
}  # fmt: skip
# Setups where the client layers are worth learning: SFL beats the frozen control by >= 10 points
GATED = ["psl", "sfl", "epsl", "central", "central-frozen", "psl-frozen", "client-fedsgd",
         "gapsl-client-fo", "gapsl-prior",
         "gapsl-track-l05", "gapsl-track", "gapsl-track-b05", "gapsl-track-prior",
         "gapsl-anchor-m01", "gapsl-anchor", "gapsl-anchor-m3", "gapsl-anchor-prior",
         "abl-track-lgi-off", "abl-track-prior-no-ema", "abl-track-prior-all",
         "abl-track-prior-lgi-off", "abl-anchor-prior-lgi-off"]  # fmt: skip
PRESETS = {
    # name: (dataset, model, cut); the devices hold most of the weights
    "digits-mlp": ("digits", "digits_mlp", "fc2"),
    "fmnist-mlp": ("fashion_mnist", "fmnist_mlp", "fc2"),
    "fmnist-cnn-fc1": ("fashion_mnist", "fmnist_cnn", "fc1"),  # convolutional: conv1-2 + fc1
    "digits-cnn-fc1": ("digits", "digits_cnn_fc", "fc1"),  # convolutional: conv1-2 + fc32
    # CIFAR-10 with two conv blocks on the devices: trained features pay off only after far more
    # rounds than 2 CPU cores afford (docs/results.md), so it is a GPU machine's study
    "cifar-cnn-block2": ("cifar10", "cifar_cnn", "block2"),
}
MAIN = [
    "psl",
    "sfl",
    "epsl",
    "central",
    "gapsl-client-fo",
    "gapsl-server-exact",
    "gapsl-cut-fo",
    "client-fedsgd",
]


def in_main(dataset: str, alpha: float, seed: int, variant: str, first_seed: int) -> bool:
    """Two cores bound the main tables: the ceiling runs one seed (its pooled data does not
    depend on alpha), and client FedSGD only on Fashion-MNIST at alpha 0.1."""
    if variant == "central":
        return seed == first_seed
    if variant == "client-fedsgd":
        return dataset == "fashion_mnist" and alpha == 0.1
    return True


ABLATION = ["psl", "gapsl-client-fo", "abl-lgi-off", "abl-no-ema", "gapsl-client-fo-l05",
            "abl-l025", "gapsl-client-exact", "abl-pull-l05", "client-fedsgd"]  # fmt: skip
