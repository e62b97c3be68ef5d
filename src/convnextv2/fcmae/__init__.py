"""FCMAE, the fully convolutional masked autoencoder: the model (``fcmae.py``), its encoder run on
visible cells only (``sparse.py``), the masked-dense reference it must equal (``masked_dense.py``)
and the masks (``masking.py``)."""
from .fcmae import NORM_PIX_EPS, FCMAE
from .io import load_fcmae, save_fcmae
from .masking import keyed_mask, random_mask, upsample_mask
