"""Shared fixtures: small random BLIP-2 checkpoints built with transformers, saved to temp dirs."""
import os
import warnings

import torch

# Without a GPU the Triton kernels run interpreted. Triton 3.9 reads TRITON_INTERPRET when
# triton.language is first imported, so it is set here, before any test module imports triton.
# With a GPU they compile for it: "0" is set first so the kernel test modules' setdefault("1") keeps it.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# On a GPU, tests launch one fixed config per shape class instead of autotuning (dozens of compiles
# per case): tests check correctness; bench/ measures speed.
os.environ.setdefault("BLIP2_FAST_AUTOTUNE", "0")

import pytest  # noqa: E402

from blip2_fast.testing import build_checkpoint

warnings.filterwarnings("ignore", message=".*falls back to the reference.*")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(lm, arch=..., **kw) -> (directory, transformers model); cached per argument set."""
    cache = {}

    def make(lm="opt", arch="Blip2ForConditionalGeneration", **kw):
        key = (lm, arch, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{lm}-{arch}")
            cache[key] = (d, build_checkpoint(d, lm, arch=arch, **kw))
        return cache[key]

    return make


def image_prompt(hf, B, text_len=6, pads=(), seed=1, image=42):
    """pixel_values, input_ids (image tokens + text) and a left-padded attention mask."""
    g = torch.Generator().manual_seed(seed)
    Q, img = hf.config.num_query_tokens, hf.config.image_token_index
    V = hf.config.text_config.vocab_size
    pv = torch.randn(B, 3, image, image, generator=g)
    ids = torch.cat([torch.full((B, Q), img), torch.randint(4, V - 2, (B, text_len), generator=g)], 1)
    mask = torch.ones_like(ids)
    for r, n in pads:
        ids[r] = torch.cat([torch.full((n,), 1), ids[r, :-n]])
        mask[r, :n] = 0
    return pv, ids, mask


@pytest.fixture(autouse=True)
def _cpu_by_default(request, monkeypatch):
    """Tests not marked `gpu` compare against transformers in fp32 on the CPU: keep load()'s default
    device there even on a machine with a GPU (where it would pick cuda + bfloat16)."""
    if request.node.get_closest_marker("gpu"):
        return
    import blip2_fast.loader as loader

    resolve = loader._resolve_device_dtype
    monkeypatch.setattr(loader, "_resolve_device_dtype", lambda device, dtype: resolve(device or "cpu", dtype))


def write_kv_case(T, H, D, block_size, num_blocks, dtype, cache_dtype, slot_dtype=torch.int64, seed=0, device="cpu"):
    """k, v [T, H, D] as strided views of a fused projection, NaN-filled caches [num_blocks,
    block_size, H, D] and T shuffled slots, a quarter of them -1 (padding): (k, v, k_cache, v_cache, slots)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3, H, D, generator=g).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.25] = -1  # padding tokens
    kc = torch.full((num_blocks, block_size, H, D), float("nan"), dtype=cache_dtype)
    return [t.to(device) for t in (k, v, kc, kc.clone(), slots.to(slot_dtype))]


def paged_case(lens, H, D, block_size, dtype, seed=0, spare_blocks=3, device="cpu"):
    """Random q [N, H, D] (a strided view, as the models pass it), a paged K/V cache with each
    sequence's tokens in shuffled blocks, its int32 block tables and seq_lens. Every slot no sequence
    owns is NaN and unused table entries point at an all-NaN block, so reading past a context shows."""
    g = torch.Generator().manual_seed(seed)
    N = len(lens)
    nblk = [(L + block_size - 1) // block_size for L in lens]
    max_blocks = max(max(nblk), 1) + 1  # one spare column: entries past every length
    num_blocks = sum(nblk) + spare_blocks + 1
    kc = torch.full((num_blocks, block_size, H, D), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    poison_block = num_blocks - 1  # stays all-NaN; unused table entries point here
    order = torch.randperm(num_blocks - 1, generator=g)
    bt = torch.full((N, max_blocks), poison_block, dtype=torch.int32)
    used = 0
    for n, L in enumerate(lens):
        blocks = order[used:used + nblk[n]]
        used += nblk[n]
        bt[n, :nblk[n]] = blocks.int()
        for t in range(L):
            kc[blocks[t // block_size], t % block_size] = torch.randn(H, D, generator=g, dtype=torch.float64)
            vc[blocks[t // block_size], t % block_size] = torch.randn(H, D, generator=g, dtype=torch.float64)
    # q as a strided view of a fused projection, the way the model produces it
    qkv = torch.randn(N, 3, H, D, generator=g, dtype=torch.float64)
    q = qkv.to(dtype)[:, 0]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, kc.to(dtype), vc.to(dtype), bt, seq_lens)]


def address_space_cap(headroom: int, imports: str = "blip2_fast, transformers") -> str:
    """Python source that imports `imports`, then caps the interpreter's address space (RLIMIT_AS) at
    what it maps by then plus `headroom` bytes: relative, as a CUDA build of torch maps gigabytes of
    libraries before any tensor. The memory-cap tests run it first in their subprocesses."""
    return (f"import resource, {imports}\n"
            "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
            f"resource.setrlimit(resource.RLIMIT_AS, (vm + {int(headroom)}, vm + {int(headroom)}))\n")
