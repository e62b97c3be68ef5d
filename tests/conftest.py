"""Shared test settings and fixtures.

The fixtures are the small things many tests build: the toy architecture (four stages of one
block, widths 8-32, a few thousand parameters), folders of random images, and a tiny FCMAE.
Factories are session-scoped so module-scoped fixtures can use them too.
"""
import getpass
import os
import tempfile

# torch.compile's on-disk cache does not key its CPU kernels by ATEN_CPU_CAPABILITY: kernels
# cached under one setting were seen to give NaN losses under another. One cache per setting
# (chosen before torch is imported) keeps runs of the suite under different settings apart.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

# The toy networks every test file builds from (imported as ``from conftest import TOY``):
TOY_DEPTHS, TOY_DIMS = (1, 1, 1, 1), (8, 16, 24, 32)
TOY = dict(depths=TOY_DEPTHS, dims=TOY_DIMS)           # four stages of one block, widths 8-32
TOY_DEEP = dict(depths=(1, 1, 2, 1), dims=TOY_DIMS)    # two blocks in stage 3 (block-wise paths)
TOY_WIDE = dict(depths=TOY_DEPTHS, dims=(16, 32, 64, 128))  # detection/segmentation backbones
TOY_FLAGS = ["--depths", *map(str, TOY_DEPTHS), "--dims", *map(str, TOY_DIMS)]  # the CLI's


def make_tiny_fcmae(in_chans=3, stem_stride=1, decoder_dim=16, **fcmae_kwargs):
    """An FCMAE around the toy encoder (patch 8 with stem stride 1, 32 with 4), seeded for
    repeatable weights; ``fcmae_kwargs`` go to ``FCMAE`` (mask ratio, loss, backend...)."""
    from convnextv2.fcmae.fcmae import FCMAE
    from convnextv2.models.registry import create_model

    torch.manual_seed(0)
    encoder = create_model("atto", num_classes=0, in_chans=in_chans, stem_stride=stem_stride,
                           **TOY)
    return FCMAE(encoder, decoder_embed_dim=decoder_dim, **fcmae_kwargs)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests use tiny tensors, where OpenMP threads syncing on a
    2-core machine (busier still when CI shares it) cost more than they give, up to 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_arch() -> dict:
    """Constructor overrides that shrink any variant to the toy network (add ``stem_stride=1``
    for 8 px patches on 32 px images)."""
    return dict(TOY)


@pytest.fixture(scope="session")
def toy_cli() -> list:
    """The toy network as command-line options of ``pretrain`` / ``finetune``."""
    return ["--model", "atto", *TOY_FLAGS, "--stem-stride", "1"]


@pytest.fixture(scope="session")
def make_images():
    """``make_images(folder, n, seed=0, classes=None, size=(36, 40))``: ``n`` random RGB PNGs
    of ``size`` (height, width), spread over class sub-folders when ``classes`` is given;
    returns ``folder``."""
    def make(folder, n, seed=0, classes=None, size=(36, 40)):
        rng = np.random.default_rng(seed)
        for i in range(n):
            sub = folder / classes[i % len(classes)] if classes else folder
            sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"{i}.png")
        return folder
    return make


@pytest.fixture(scope="session")
def tiny_fcmae():
    """``make_tiny_fcmae`` as a fixture."""
    return make_tiny_fcmae


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """``torch.compile`` pointed at the "aot_eager" backend for one test (dynamo's graph capture
    and AOT autograd, what a recipe's ``--compile`` can break; inductor's code generation of a
    whole model takes minutes on 2 cores). Returns the list of the modules it compiled."""
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(model, **options):
        compiled.append(model)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    return compiled


def write_png_header(path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` (8-bit gray) but holds one row of data: what a
    reader sees of a huge image before decoding it, in a few bytes (a real 20000x20000 file
    takes 400 MB to write)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                + chunk(b"IEND", b""))


# -- released weights without the network (test_pretrained.py, test_cli_table.py) --------------
class LocalFileServer:
    """An HTTP server on 127.0.0.1 standing in for the official download site: serves
    ``files`` (URL path -> bytes) and records ``requests``; a path in ``truncate`` announces its
    full length, sends half and hangs up. ``close()`` when done."""

    def __init__(self):
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's hook
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if self.path in outer.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def unreachable_weight_sources(monkeypatch, folder):
    """Cut the Hub and the official URL off (a closed port), with empty caches under
    ``folder``. Returns the recorder of Hub calls; set its ``answer`` to a file path to make
    the Hub answer with it."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    class Hub:
        calls: list = []
        answer = None

    def hf_hub_download(repo_id, filename, **kw):
        Hub.calls.append((repo_id, filename))
        if Hub.answer is None:
            raise LocalEntryNotFoundError("cannot reach the Hub and the file is not cached")
        return str(Hub.answer)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder / "hf"))
    monkeypatch.setenv("CONVNEXTV2_CACHE", str(folder / "cache"))
    monkeypatch.setenv("CONVNEXTV2_WEIGHTS_URL", "http://127.0.0.1:9/closed")
    return Hub
