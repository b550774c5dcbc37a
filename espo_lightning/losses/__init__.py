"""Policy losses: ESPO (the headline algorithm), the GRPO, DAPO, GSPO, CISPO and GMPO baselines, and the
entropy-aware baselines SAPO, Clip-Cov, KL-Cov and the high-entropy token mask (a wrapper).

Pick one in YAML by ``class_path`` (e.g. ``espo_lightning.losses.ESPOLoss``); DAPO is
``GRPOLoss`` with ``epsilon_high: 0.28`` and ``loss_aggregation: token_mean``. Every loss follows the
``PolicyLoss`` contract in ``base.py``.
"""
from espo_lightning.losses.base import PolicyLoss
from espo_lightning.losses.cispo import CISPOLoss
from espo_lightning.losses.covariance import ClipCovLoss, KLCovLoss
from espo_lightning.losses.entropy_mask import HighEntropyMaskLoss
from espo_lightning.losses.espo import ESPOLoss
from espo_lightning.losses.gmpo import GMPOLoss
from espo_lightning.losses.grpo import GRPOLoss
from espo_lightning.losses.gspo import GSPOLoss
from espo_lightning.losses.kl import kl_divergence
from espo_lightning.losses.sapo import SAPOLoss

__all__ = ["PolicyLoss", "ESPOLoss", "GSPOLoss", "GRPOLoss", "CISPOLoss", "GMPOLoss", "SAPOLoss", "ClipCovLoss",
           "KLCovLoss", "HighEntropyMaskLoss", "kl_divergence"]
