"""The whole BERT network, top to bottom: embeddings, self-attention, block, encoder, pooler, and every head.

Module and parameter names follow Hugging Face's `modeling_bert.py` exactly (`encoder.layer.0.attention.self.query`,
`cls.predictions.bias`, ...) so that a state dict moves between the two with no renaming.

Two things differ from a plain transcription of the paper, both for speed and both exact:
- Padding is removed from the encoder's work: when a batch has padding, the tokens are packed into one (N, H)
  matrix for every linear layer and re-padded only inside attention (or not at all, where FlashAttention's varlen
  kernel runs: `Kernels`), so cost follows real tokens.
- The masked-LM head can run on the masked positions only (`masked_positions=`), so the 30k-wide vocabulary
  projection is paid for ~15% of the tokens instead of all of them.

Shapes in the comments: B examples in a batch, T positions (the batch's padded length), N real tokens of the batch
packed (N <= B*T), M masked positions, H hidden size, nh heads, hs head size (H = nh * hs), V vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bertkit.config import BertConfig
from bertkit.errors import BertkitError


@dataclass
class ModelOutput:
    """What a model returns; fields a model does not produce stay None (names as in transformers)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None  # (B, T, H)
    pooler_output: torch.Tensor | None = None  # (B, H)
    prediction_logits: torch.Tensor | None = None  # (B, T, V), or (M, V) for the M masked positions
    seq_relationship_logits: torch.Tensor | None = None  # (B, 2)
    masked_lm_loss: torch.Tensor | None = None
    next_sentence_loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None  # (B, T)
    end_logits: torch.Tensor | None = None  # (B, T)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (B, T, H) of the embeddings and of each block's output
    embeddings: torch.Tensor | None = None  # a sentence-embedding model's vectors: (B, H), or (B, K, H) unit ones

    def __getitem__(self, name: str):
        return getattr(self, name)


def activation(name: str):
    """The FFN non-linearity: exact (erf) GELU as in the original BERT, or the tanh approximation."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


@dataclass
class Kernels:
    """How the encoder computes, never what: every choice gives the same outputs and gradients up to float rounding
    (tests/test_model.py), and `benchmarks/ablation.py` measures each by undoing it. Set per model with `set_kernels`.

    packing: the linear layers run on the real tokens only, packed into (N, H) ("always"), or on the padded
        (B, T, H) batch ("never"); "auto" packs on the CPU, and on a GPU only batches of at least 2^24 B*T*H
        elements: below that a GPU waits on kernel launches, padding is nearly free there and the gathers cost
        more than they save (measured on an H100, benchmarks/RESULTS.md).

    attention: over packed tokens, "padded" re-pads Q, K and V for one masked SDPA call; "varlen" runs
        FlashAttention's variable-length kernel on the packed rows themselves, each sequence over its own tokens, with
        no padding anywhere (`varlen_attention`: CUDA, in float16 or bfloat16). Not the default until a GPU has
        measured it. An earlier "varlen" through jagged nested tensors cost 0.34x a base training step on an H200
        and was removed: every operation on those tensors passes through a Python subclass; this one calls the
        kernel directly.
    pack_multiple: the packed token count is rounded up to a multiple of this by taking some of the batch's padding
        positions along as filler rows (computed, never attended to by real tokens, not read), so that packed
        batches repeat their shapes and `compile_blocks(mode="static")` can keep them packed.

    Two other choices were built, measured and removed (benchmarks/RESULTS.md, issue 14): attention over the packed
    tokens as jagged nested tensors (above) and fused element-wise tails (bias + GELU, dropout + residual + LayerNorm
    compiled; 0.92x on the H200).
    """

    packing: str = "auto"
    attention: str = "padded"
    pack_multiple: int = 1

    def __post_init__(self):
        for name, allowed in (("packing", ("auto", "always", "never")), ("attention", ("padded", "varlen"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if not isinstance(self.pack_multiple, int) or self.pack_multiple < 1:
            raise ValueError(f"pack_multiple={self.pack_multiple!r}; expected a whole number >= 1")


PACKING_MIN_ELEMENTS = 1 << 24  # B*T*H from which "auto" packing pays on a GPU


def packs(kernels: Kernels, on_gpu: bool, elements: int) -> bool:
    """Whether a padded batch of `elements` = B*T*H runs packed (the rule of `Kernels.packing`)."""
    return kernels.packing == "always" or (kernels.packing == "auto" and (not on_gpu or elements >= PACKING_MIN_ELEMENTS))


ATTENTION_MULTIPLE = 16  # on the CPU, a re-padded batch's length inside attention is rounded up to this


class Layout:
    """Where the real tokens of a padded (B, T) batch sit once packed into (N, ...) rows, and which keys each query
    may see (padding, a causal mask, or local windows with global tokens).

    With no padding, or when `kernels` keeps the batch padded, tensors stay (B, T, ...) and `unpad`, `pad`,
    `to_attention`, `from_attention` and `select` are the identity.

    Packed rows are re-padded for attention to S positions an example: T, or on the CPU T rounded up to a multiple of
    16 (masked), since PyTorch's CPU attention kernel runs whole blocks of 16 about twice as fast as a ragged tail (B
    32, 12 heads of 32: 4.3 ms at T = 47, 2.2 ms at 48; benchmarks/RESULTS.md). It costs no copy: the re-padding
    allocates the batch anyway.
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, length: int, causal: bool = False,
                 window: int = 0, global_mask: torch.Tensor | None = None, kernels: Kernels | None = None,
                 width: int = 0, device: torch.device | None = None):
        kernels = kernels or Kernels()
        self.batch, self.length = batch, length
        self.indices = None  # flat indices into B*T of the real tokens in row-major order, then any filler rows
        self.span = length  # S: positions an example inside attention
        self.span_indices = None  # flat indices into B*S of the same rows
        self.attn_mask = None  # (B, 1, 1, S) bool, True where a key may be attended to; (B, 1, S, S) when causal
        self.is_causal = causal  # a left-to-right model: position t attends to positions <= t only
        self.causal = causal
        self.offsets = None  # (B + 1 + F,) int32: where each sequence starts in the packed rows, for varlen attention
        keep = attention_mask.bool() if attention_mask is not None else None
        padded = keep is not None and not bool(keep.all())
        on_gpu = keep is not None and keep.device.type != "cpu"
        if padded and packs(kernels, on_gpu, batch * length * width):
            self.indices = keep.flatten().nonzero().squeeze(1)
            if kernels.pack_multiple > 1:
                self.indices = with_filler_rows(keep, self.indices, kernels.pack_multiple)
        self.windows = None  # LocalWindows when attention is windowed and the window does not cover the input
        if window and length > window // 2 + 1:
            if keep is None:  # on the input's device: the window masks are built from it
                keep = torch.ones(batch, length, dtype=torch.bool, device=device)
            self.windows = LocalWindows(keep, global_mask, window // 2)
        if self.indices is not None and self.windows is None:
            if kernels.attention == "varlen":
                self.offsets = sequence_offsets(keep, len(self.indices), length, kernels.pack_multiple)
            elif not on_gpu and not torch.jit.is_tracing():  # a trace (ONNX export) would freeze S as a constant
                self.span = round_up(length, ATTENTION_MULTIPLE)
        self.span_indices = self.indices
        if self.span != length:
            self.span_indices = self.indices // length * self.span + self.indices % length
        if padded:
            self.attn_mask = F.pad(keep, (0, self.span - length), value=False)[:, None, None, :]
            if causal:  # SDPA takes a mask or is_causal, not both: the two become one mask
                past = torch.ones(self.span, self.span, dtype=torch.bool, device=keep.device).tril()
                self.attn_mask = self.attn_mask & past
                self.is_causal = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """(B, nh, S, hs) each -> (B, nh, S, hs): attention under this batch's masks (windowed, or one SDPA call)."""
        if self.windows is not None:
            return self.windows.attend(q, k, v, dropout_p)
        if attends_in_fp32(q):
            with torch.autocast("cpu", enabled=False):
                return self.attend(q.float(), k.float(), v.float(), dropout_p).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask, dropout_p=dropout_p,
                                              is_causal=self.is_causal)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): keep the real tokens."""
        return self._gather(x, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...): zeros where the padding was (filler rows keep their values)."""
        return self._scatter(x, self.indices, self.length)

    def to_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, S, ...): packed rows re-padded for attention, zeros elsewhere."""
        return self._scatter(x, self.span_indices, self.span)

    def from_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (N, ...): attention's rows of the real tokens (and filler rows)."""
        return self._gather(x, self.span_indices)

    def _gather(self, x: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            return x
        return x.reshape(-1, *x.shape[2:]).index_select(0, indices)

    def _scatter(self, x: torch.Tensor, indices: torch.Tensor | None, length: int) -> torch.Tensor:
        if indices is None:
            return x
        out = x.new_zeros(self.batch * length, *x.shape[1:])
        out.index_copy_(0, indices, x)  # in place: the out-of-place form copies the zeros first
        return out.view(self.batch, length, *x.shape[1:])

    def select(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of x (packed or not) at the True entries of a (B, T) bool mask, in row-major order."""
        if self.indices is None:
            return x[positions]
        flat = positions.flatten().index_select(0, self.indices)
        return x[flat]


def attends_in_fp32(q: torch.Tensor) -> bool:
    """Whether attention over bf16 `q` runs in fp32: on the CPU when it will be differentiated, as PyTorch's CPU
    attention backward is 2-6x slower in bf16 than in fp32 (its forward is faster). Without attention dropout, 1.14x
    a `mini` and 1.06-1.11x a `base` pretraining step under bf16 autocast; with it (the CPU's math path) within noise
    (benchmarks/RESULTS.md, stop 34)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def with_filler_rows(keep: torch.Tensor, indices: torch.Tensor, multiple: int) -> torch.Tensor:
    """The N real tokens' flat indices, then the first padding positions of the (B, T) batch as filler rows up to a
    multiple of `multiple` (at most B*T rows)."""
    total = min(round_up(len(indices), multiple), keep.numel())
    filler = (~keep).flatten().nonzero().squeeze(1)[: total - len(indices)]
    return torch.cat([indices, filler])


def sequence_offsets(keep: torch.Tensor, rows: int, length: int, multiple: int) -> torch.Tensor:
    """(B, T) real-token mask -> int32 offsets of the sequences in the packed rows: the B examples, then the filler
    rows (`with_filler_rows`, fewer than `multiple`) as sequences of at most T rows, some of them empty: varlen
    attention writes only rows inside a sequence and takes T as the longest, and the offsets' shape must repeat."""
    lengths = keep.sum(1, dtype=torch.int32)
    real = int(keep.sum())
    fillers = -(-(multiple - 1) // length)
    tail = torch.tensor([min(real + length * j, rows) for j in range(1, fillers + 1)], dtype=torch.int32)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32), tail.to(keep.device)])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_length: int,
                     dropout_p: float, causal: bool) -> torch.Tensor:
    """(N, nh, hs) each -> (N, nh, hs): the rows of each sequence (offsets[i] to offsets[i + 1]) attend to their own
    rows only, through FlashAttention's variable-length kernel as PyTorch ships it. PyTorch's public
    `torch.nn.attention.varlen.varlen_attn` calls the same kernel but without dropout, which BERT's attention has."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"varlen attention runs FlashAttention's CUDA kernel, which takes CUDA tensors in float16 or "
                         f"bfloat16 (autocast); got {q.dtype} on {q.device.type}")
    return torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, max_length, max_length, dropout_p,
                                                   causal, False)[0]


class LocalWindows:
    """Sliding-window attention with global tokens (Longformer's pattern), in blocks, so that time and memory grow
    linearly with the length T: every query attends to the keys at most r positions away and to the G global
    tokens; a global token's query attends to every key.

    The T queries are cut into nb = ceil(T / r) blocks of r; block b's queries lie within r of the 3r keys from
    b*r - r to b*r + 2r, a strided view of the keys padded by r at both ends, so one SDPA call over (B*nb) blocks of
    (r queries x 3r + G keys) computes every local row. A global key inside a window is masked there, as it is
    already among the G global keys. Up to T = 3r, where T x T scores are fewer than T x 3r, the pattern is one
    (B, 1, T, T) mask instead. The masks depend only on the batch, so they are built once for all layers.
    """

    def __init__(self, keep: torch.Tensor, global_mask: torch.Tensor | None, radius: int):
        B, T = keep.shape
        r = radius
        device = keep.device
        self.radius, self.blocks = r, -(-T // r)
        self.padded = self.blocks * r  # Tp: queries padded to whole blocks
        if global_mask is None:  # [CLS] is the token that encodes the input: it sees, and is seen by, everything
            global_mask = torch.zeros_like(keep)
            # the first real token, not position 0, which is padding when a row is padded on the left
            global_mask[torch.arange(B, device=device), keep.to(torch.uint8).argmax(1)] = True
        global_mask = global_mask.bool() & keep
        G = max(int(global_mask.sum(1).max()), 1)
        # each example's global positions first, in order; the slots left over point at position T and are masked
        order = torch.sort((~global_mask).to(torch.int8), dim=1, stable=True).indices[:, :G]  # (B, G)
        self.global_valid = global_mask.gather(1, order)  # (B, G)
        self.global_index = torch.where(self.global_valid, order, torch.full_like(order, T))
        self.global_mask = global_mask

        self.dense_mask = None
        if T <= 3 * r:  # up to three blocks, T x T scores are fewer than T x 3r: the pattern as one mask
            i = torch.arange(T, device=device)
            near = (i[:, None] - i[None]).abs() <= r
            self.dense_mask = ((near | global_mask[:, None, :] | global_mask[:, :, None]) & keep[:, None, :])[:, None]
            self.dense_mask = self.dense_mask | ~keep[:, None, :, None]  # padding queries: no empty softmax row
            return
        pad = lambda m: F.pad(m, (r, self.padded - T + r), value=False)  # (B, Tp + 2r): key coordinates shifted by r
        key_ok = (pad(keep) & ~pad(global_mask)).unfold(1, 3 * r, r)  # (B, nb, 3r)
        query = torch.arange(self.padded, device=device).view(self.blocks, r, 1)
        key = (torch.arange(self.blocks, device=device) * r).view(-1, 1, 1) + torch.arange(3 * r, device=device) - r
        near = (query - key).abs() <= r  # (nb, r, 3r)
        local = near & key_ok[:, :, None, :]  # (B, nb, r, 3r)
        # a padding query (or one past T) sees its window unmasked, so that no row of the softmax is empty; its
        # output is dropped
        real_query = F.pad(keep, (0, self.padded - T), value=False).view(B, self.blocks, r, 1)
        local = local | (near & ~real_query)
        glob = self.global_valid[:, None, None, :].expand(B, self.blocks, r, G)
        self.block_mask = torch.cat([local, glob], dim=-1).reshape(B * self.blocks, 1, r, 3 * r + G)
        self.key_mask = keep[:, None, None, :]  # (B, 1, 1, T): the global queries' mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """(B, nh, T, hs) each -> (B, nh, T, hs)."""
        if self.dense_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask, dropout_p=dropout_p)
        B, nh, T, hs = q.shape
        r, nb, Tp = self.radius, self.blocks, self.padded
        G = self.global_index.shape[1]

        def blocks_of(x):  # (B, nh, T, hs) -> (B*nb, nh, 3r + G, hs): each block's window of keys, then the globals
            window = F.pad(x, (0, 0, r, Tp - T + r)).unfold(2, 3 * r, r).transpose(-1, -2)  # (B, nh, nb, 3r, hs)
            glob = gather_rows(x, self.global_index)[:, :, None].expand(B, nh, nb, G, hs)
            return torch.cat([window, glob], dim=3).transpose(1, 2).reshape(B * nb, nh, 3 * r + G, hs)

        queries = F.pad(q, (0, 0, 0, Tp - T)).view(B, nh, nb, r, hs).transpose(1, 2).reshape(B * nb, nh, r, hs)
        y = F.scaled_dot_product_attention(queries, blocks_of(k), blocks_of(v), attn_mask=self.block_mask,
                                           dropout_p=dropout_p)
        y = y.view(B, nb, nh, r, hs).transpose(1, 2).reshape(B, nh, Tp, hs)[:, :, :T]
        # the global queries attend to every real key; their rows replace the local ones
        global_y = F.scaled_dot_product_attention(gather_rows(q, self.global_index), k, v, attn_mask=self.key_mask,
                                                  dropout_p=dropout_p)  # (B, nh, G, hs)
        y = F.pad(y, (0, 0, 0, 1))  # row T takes the writes of the unused global slots
        index = self.global_index[:, None, :, None].expand(B, nh, G, hs)
        return y.scatter(2, index, global_y)[:, :, :T]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) and (B, G) positions (T meaning none: a row of zeros) -> (B, nh, G, hs)."""
    B, nh, T, hs = x.shape
    x = F.pad(x, (0, 0, 0, 1))
    return x.gather(2, index[:, None, :, None].expand(B, nh, index.shape[1], hs))


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


class BertEmbeddings(nn.Module):
    """Token + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):  # any matching shapes -> (..., H)
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


# ---------------------------------------------------------------------------------------------------------------
# Encoder


class LoraLinear(nn.Module):
    """A frozen Linear plus a trained low-rank update (LoRA, Hu et al. 2021): x W^T + b + (x A^T) B^T alpha / r,
    A (r, in) and B (out, r). B starts at zero, so the model starts as the pretrained one.

    W and b keep the Linear's parameter names and A and B take peft's (`query.lora_A.weight`), so the state dict
    is transformers' plus the adapter, and its LoRA and head weights prefixed `base_model.model.` are what peft saves
    as an adapter (`bertkit.adapter.save_adapter`). `merged` folds the update into a plain Linear."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)  # torch's (and peft's) default init
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class BertSelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; Q, K and V computed in one fused matmul."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self._fused = None  # (weights' versions, fused weight, fused bias), reused while the weights are unchanged
        # one module computing (N, 3H) Q, K, V in place of the three, when set: bertkit.quantize.to_int8 puts an
        # int8 Linear here, as an int8 GEMM has no weight to concatenate per call
        self.qkv: nn.Module | None = None

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q, K and V weights as one (3H, H) matrix, so that one GEMM replaces three.

        The three Linear modules stay, for the Hugging Face parameter names. Under autograd the concatenation is
        redone each call (its backward splits the gradient); without autograd it is cached, so inference pays the
        copy once. The cache goes at every forward under autograd (a training step may follow, and torch's fused
        AdamW updates weights without bumping their versions) and when an in-place change (a load, an unfused
        optimizer) bumps a weight's version.
        """
        params = (self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias, self.value.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._fused = None
            return torch.cat(params[:3]), torch.cat(params[3:])
        versions = tuple((p.data_ptr(), p._version) for p in params)
        if (self._fused is None or self._fused[0] != versions
                # made under torch.inference_mode, it cannot enter autograd (a frozen layer under trainable ones)
                or torch.is_grad_enabled() and self._fused[1].is_inference()):
            self._fused = (versions, torch.cat(params[:3]), torch.cat(params[3:]))
        return self._fused[1], self._fused[2]

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:  # (N, H) or (B, T, H)
        if self.qkv is not None:  # int8: one quantized Linear, query, key and value gone
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, *self.fused_qkv())
            for i, projection in enumerate((self.query, self.key, self.value)):
                if isinstance(projection, LoraLinear):  # the frozen weight is in the fused GEMM; the update added here
                    qkv[..., i * projection.out_features:(i + 1) * projection.out_features] += projection.delta(x)
        dropout_p = self.dropout_p if self.training else 0.0
        if layout.offsets is not None:  # packed rows straight into varlen attention: (N, 3H) -> (N, H)
            N = qkv.shape[0]
            q, k, v = qkv.view(N, 3, self.num_heads, self.head_size).unbind(1)  # (N, nh, hs) each
            y = varlen_attention(q, k, v, layout.offsets, layout.length, dropout_p, layout.causal)
            return y.reshape(N, self.num_heads * self.head_size)
        qkv = layout.to_attention(qkv)  # (B, S, 3H)
        B, S, _ = qkv.shape
        q, k, v = qkv.view(B, S, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nh, S, hs) each
        y = layout.attend(q, k, v, dropout_p)
        return layout.from_attention(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_size))


class BertAddNorm(nn.Module):
    """Project, dropout, add the residual, LayerNorm: the post-LN sub-layer output of the paper's block."""

    def __init__(self, d_in: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertAddNorm(config.hidden_size, config)

    def forward(self, x, layout):
        return self.output(self.self(x, layout), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN Transformer block: self-attention, then the 4H feed-forward network."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertAddNorm(config.intermediate_size, config)

    def forward(self, x, layout):
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        # training keeps only each block's input and runs the block again in backward (`activation_checkpointing_enable`)
        self.activation_checkpointing = False

    def forward(self, x, layout, states: list | None = None):
        """The last block's output; `states`, when given, gets the input and every block's output appended."""
        if states is not None:
            states.append(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layer:
            if recompute:  # the rerun draws the same dropout masks (the RNG state is kept): the same gradients
                x = torch.utils.checkpoint.checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
            if states is not None:
                states.append(x)
        return x


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence-level representation the NSP and classification heads read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_hidden):  # (B, H)
        return torch.tanh(self.dense(cls_hidden))


# ---------------------------------------------------------------------------------------------------------------
# Base class: weight init and checkpoint I/O shared by every model


class BertPreTrainedModel(nn.Module):
    """Initialisation as in the original BERT, and `from_pretrained` / `save_pretrained` in the HF layout."""

    base_model_prefix = "bert"
    # heads a fine-tuning model adds on top of a pretrained encoder: reported as newly initialised, not an error
    head_prefixes: tuple[str, ...] = ()

    @property
    def trained_prefixes(self) -> tuple[str, ...]:
        """The heads that train beside the LoRA matrices (`add_lora`): all of them, where a model has heads."""
        return self.head_prefixes

    @property
    def saved_architecture(self) -> str:
        """The class config.json's `architectures` names: the one transformers builds for this model."""
        return type(self).__name__

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config

    def init_weights(self):
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def activation_checkpointing_enable(self, enable: bool = True) -> None:
        """In training, keep each encoder block's input only and run the block again in backward: the activations of
        one block instead of L, for a second forward through the encoder (base at length 512 on a CPU: 0.45x the
        peak memory, 0.76x the speed; benchmarks/RESULTS.md). Gradients are unchanged. transformers' name, as
        `activation_checkpointing_disable` and the older `gradient_checkpointing_enable` / `_disable`."""
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.activation_checkpointing = enable

    def activation_checkpointing_disable(self) -> None:
        self.activation_checkpointing_enable(False)

    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    @classmethod
    def from_pretrained(cls, directory, config: BertConfig | None = None, load_weights: bool = True, **config_overrides):
        """Load a model folder in the Hugging Face layout (bertkit's or transformers'); with load_weights=False,
        the same architecture with freshly initialised weights."""
        from bertkit.checkpoint import load_pretrained

        return load_pretrained(cls, directory, config=config, load_weights=load_weights, **config_overrides)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write config.json and model.safetensors (and the tokenizer files when given) in the HF layout."""
        from bertkit.checkpoint import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer)


class BertModel(BertPreTrainedModel):
    """The bare encoder: embeddings, L blocks, and (optionally) the pooler."""

    base_model_prefix = ""
    head_prefixes = ("pooler.",)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.kernels = Kernels()  # how it computes (not saved: a choice of the machine, not of the model)
        self.init_weights()

    def encode(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, global_attention_mask=None,
               states: list | None = None):
        """Run the encoder; returns the hidden states of the real tokens, packed (N, H) when there was padding.
        With `config.attention_window`, `global_attention_mask` (B, T) marks the tokens that attend to and are
        attended by every token (default: [CLS]). `states`, when given, gets the embeddings' output and every
        block's appended, packed alike."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        # (T,) or (1, T) given for the whole batch, as transformers takes them; the packed rows need (B, T)
        token_type_ids, position_ids = token_type_ids.expand(B, T), position_ids.expand(B, T)
        layout = Layout(attention_mask, B, T, causal=self.config.is_decoder, window=self.config.attention_window,
                        global_mask=global_attention_mask, kernels=self.kernels, width=self.config.hidden_size,
                        device=input_ids.device)
        x = self.embeddings(layout.unpad(input_ids), layout.unpad(token_type_ids), layout.unpad(position_ids))
        return self.encoder(x, layout, states), layout

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None,
                global_attention_mask=None, output_hidden_states: bool = False) -> ModelOutput:
        """The last layer's states and the pooled [CLS]; with `output_hidden_states`, as in transformers, also the
        embeddings' output and every block's, L + 1 tensors (B, T, H) padded as last_hidden_state is: the features
        of the paper's feature-based approach (section 5.3)."""
        states = [] if output_hidden_states else None
        hidden, layout = self.encode(input_ids, token_type_ids, attention_mask, position_ids, global_attention_mask,
                                     states)
        sequence = layout.pad(hidden)  # (B, T, H); zeros at padding
        pooled = self.pooler(self.summary(sequence, attention_mask)) if self.pooler is not None else None
        all_states = tuple(layout.pad(h) for h in states) if states is not None else None
        return ModelOutput(last_hidden_state=sequence, pooler_output=pooled, hidden_states=all_states)

    def summary(self, sequence: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) -> (B, H): the token that encodes the whole input, [CLS], the first real token; in a
        left-to-right model [CLS] sees only itself, so there it is the last real token (as GPT classifies).

        With padding on the left, [CLS] is not at position 0: transformers' pooler reads position 0 all the same (a
        padding token's state), and so did this one, which reads zeros there once the padding is packed away (every
        left-padded row then pooled to the same tanh(b)). Reading the first real token makes a left-padded row pool
        as it does alone, on every kernel; with padding on the right nothing changes."""
        B, T, _ = sequence.shape
        if not self.config.is_decoder:
            if attention_mask is None:
                return sequence[:, 0]
            # argmax gives the first of equal maxima: the lowest real position (0 for a row of padding alone)
            token = attention_mask.bool().to(torch.uint8).argmax(1)
        elif attention_mask is None:
            token = torch.full((B,), T - 1)
        else:  # the highest real position: padding may be on the left, and a mask may be float
            token = (attention_mask.bool() * torch.arange(T, device=attention_mask.device)).argmax(1)
        return sequence[torch.arange(B, device=sequence.device), token.to(sequence.device)]


# ---------------------------------------------------------------------------------------------------------------
# Heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Masked-LM head. The decoder is the token-embedding matrix itself (tied, as in the paper): the input and
    output word representations share one table, which saves V*H parameters and trains better on small data. A
    config with `tie_word_embeddings: false` (a checkpoint converted that way) has a decoder of its own."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = None if config.tied_decoder else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x, word_embeddings):  # (..., H) -> (..., V)
        decoder = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.transform(x), decoder, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def _labels_at_tokens(labels: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token labels with those at padding set to -100 (not scored). Packing leaves no hidden state at padding,
    so a label there (`labels = input_ids`, say) gave each kernel another loss; transformers scores such labels."""
    if labels is None or attention_mask is None:
        return labels
    return labels.masked_fill(~attention_mask.bool(), -100)


def _masked_lm(model, input_ids, token_type_ids, attention_mask, position_ids, labels, masked_positions):
    """Shared by the pretraining and MLM models: encoder, then vocabulary logits at all or only masked positions
    (those at padding are dropped, as their labels are)."""
    hidden, layout = model.bert.encode(input_ids, token_type_ids, attention_mask, position_ids)
    labels = _labels_at_tokens(labels, attention_mask)
    if masked_positions is not None and attention_mask is not None:
        masked_positions = masked_positions & attention_mask.bool()
    embeddings = model.bert.embeddings.word_embeddings.weight
    if masked_positions is None:
        logits = model.cls.predictions(layout.pad(hidden), embeddings)  # (B, T, V)
        targets = labels
    else:
        logits = model.cls.predictions(layout.select(hidden, masked_positions), embeddings)  # (M, V)
        targets = labels[masked_positions] if labels is not None else None
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return hidden, layout, logits, loss


class BertForPreTraining(BertPreTrainedModel):
    """BERT with both pretraining heads: masked LM (decoder tied to the embeddings) and next-sentence prediction on
    the pooler."""

    head_prefixes = ("cls.", "bert.pooler.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def forward(
        self,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        next_sentence_label=None,
        masked_positions=None,
    ) -> ModelOutput:
        """`labels` (B, T) hold the original ids at predicted positions and -100 elsewhere (labels at padding are
        not scored). With `masked_positions` (a (B, T) bool mask, usually `labels != -100`) the vocabulary
        projection runs only there and `prediction_logits` is (M, V), M the masked positions; the loss is the same
        as over the full sequence. The loss is the sum of the MLM and NSP losses that have labels."""
        hidden, layout, logits, mlm_loss = _masked_lm(
            self, input_ids, token_type_ids, attention_mask, position_ids, labels, masked_positions
        )
        nsp_logits = self.cls.seq_relationship(self.bert.pooler(self.bert.summary(layout.pad(hidden), attention_mask)))
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label.reshape(-1))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return ModelOutput(
            loss=sum(losses) if losses else None,
            masked_lm_loss=mlm_loss,
            next_sentence_loss=nsp_loss,
            prediction_logits=logits,
            seq_relationship_logits=nsp_logits,
        )


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the masked-LM head alone (no pooler, no NSP)."""

    head_prefixes = ("cls.",)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(
        self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, labels=None, masked_positions=None
    ) -> ModelOutput:
        """As `BertForPreTraining.forward`, without the sentence objective."""
        _, _, logits, loss = _masked_lm(
            self, input_ids, token_type_ids, attention_mask, position_ids, labels, masked_positions
        )
        return ModelOutput(loss=loss, masked_lm_loss=loss, logits=logits, prediction_logits=logits)


def _classifier_dropout(config: BertConfig) -> nn.Dropout:
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


def _bilstm(config: BertConfig) -> nn.LSTM | None:
    """The paper's "+ BiLSTM" (Table 5), when `config.bilstm`: a randomly initialised (PyTorch's init) bidirectional
    LSTM over the encoder's outputs, under the head; each direction H/2 wide, so the head still sees H."""
    if not config.bilstm:
        return None
    return nn.LSTM(config.hidden_size, config.hidden_size // 2, batch_first=True, bidirectional=True)


def _run_bilstm(lstm: nn.LSTM, sequence: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H) -> the LSTM's (B, T, H) outputs over the real tokens (zeros at padding) and its (B, H) summary:
    the forward direction's state after the last real token and the backward one's after the first."""
    B, T, H = sequence.shape
    if attention_mask is None:
        keep = torch.ones(B, T, dtype=torch.bool, device=sequence.device)
    else:
        keep = attention_mask.bool().to(sequence.device)
    # a packed sequence is a row's first `length` positions: the real tokens are moved there in order (padding may
    # be on the left), and the outputs moved back
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[..., None].expand(B, T, H)
    lengths = keep.sum(1).clamp(min=1).cpu()  # a row of padding alone reads one padding position: no length 0
    packed = nn.utils.rnn.pack_padded_sequence(sequence.gather(1, order), lengths, batch_first=True,
                                               enforce_sorted=False)
    out, (h, _) = lstm(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    return torch.zeros_like(out).scatter(1, order, out), torch.cat([h[0], h[1]], dim=-1)


class BertForSequenceClassification(BertPreTrainedModel):
    """A linear layer on the pooled [CLS]: softmax over num_labels classes, regression when num_labels == 1, or, with
    config.json's problem_type "multi_label_classification" (transformers' name), a sigmoid per label: any number
    of them may hold (the loss is binary cross-entropy over every label, `labels` one 0/1 row per example). With
    `config.bilstm` the layer reads the BiLSTM's summary of the sequence instead (no pooler)."""

    head_prefixes = ("classifier.", "bert.pooler.", "bilstm.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        problem = config.extra.get("problem_type")  # transformers' name; unset, it follows num_labels as here
        single = "regression" if config.num_labels == 1 else "single_label_classification"
        if problem not in (None, single, "multi_label_classification"):
            raise BertkitError(f"problem_type {problem!r} with num_labels {config.num_labels} is not supported; "
                               "expected single-label classification (softmax; num_labels > 1), regression "
                               "(num_labels 1) or multi_label_classification. To start a new task from this "
                               "checkpoint, remove problem_type from its config.json")
        self.multi_label = problem == "multi_label_classification"
        # training only, not saved (the model computes the same logits without them): a weight on each label's
        # positive term of a multi-label loss (`finetune --pos-weight`), or on each class's examples in a single-label
        # one (`finetune --class-weight`)
        self.pos_weight: torch.Tensor | None = None
        self.class_weight: torch.Tensor | None = None
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=not config.bilstm)
        self.bilstm = _bilstm(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, labels=None):
        out = self.bert(input_ids, token_type_ids, attention_mask, position_ids)
        if self.bilstm is not None:
            pooled = _run_bilstm(self.bilstm, out.last_hidden_state, attention_mask)[1]
        else:
            pooled = out.pooler_output
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=self.pos_weight)
            elif self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
            else:
                loss = F.cross_entropy(logits, labels.reshape(-1), weight=self.class_weight)
        return ModelOutput(loss=loss, logits=logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span extraction: a start vector and an end vector dotted with every token's final hidden state."""

    head_prefixes = ("qa_outputs.", "bilstm.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.bilstm = _bilstm(config)  # with config.bilstm, the vectors are dotted with its outputs instead
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
    ) -> ModelOutput:
        global_mask = None
        if self.config.attention_window and token_type_ids is not None:
            global_mask = token_type_ids == 0  # [CLS], the question and its [SEP] (Longformer's global tokens for QA)
        sequence = self.bert(input_ids, token_type_ids, attention_mask, position_ids, global_mask).last_hidden_state
        if self.bilstm is not None:
            sequence = _run_bilstm(self.bilstm, sequence, attention_mask)[0]
        logits = self.qa_outputs(sequence)  # (B, T, 2)
        if attention_mask is not None:
            # padding can never be an answer; transformers leaves pad logits in the softmax, which makes its loss
            # depend on what a batch is padded to, so here (and only with padding) the two differ by design
            logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
        start_logits, end_logits = logits.unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the window are clamped to T and ignored, as in transformers
            T = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, T)
            end = end_positions.reshape(-1).clamp(0, T)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=T) + F.cross_entropy(end_logits, end, ignore_index=T)
            ) / 2
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


class BertForTokenClassification(BertPreTrainedModel):
    """A linear layer on every token's final hidden state (NER-style tagging); labels -100, and labels at padding,
    are ignored. With `config.bilstm` the layer reads the BiLSTM's output at each token instead."""

    head_prefixes = ("classifier.", "bilstm.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.bilstm = _bilstm(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, labels=None):
        sequence = self.bert(input_ids, token_type_ids, attention_mask, position_ids).last_hidden_state
        if self.bilstm is not None:
            sequence = _run_bilstm(self.bilstm, sequence, attention_mask)[0]
        logits = self.classifier(self.dropout(sequence))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            labels = _labels_at_tokens(labels, attention_mask)
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits)


class BertForMultipleChoice(BertPreTrainedModel):
    """Each choice encoded as its own pair; a linear layer scores every pooled [CLS]; softmax over the choices."""

    head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, labels=None):
        B, C, T = input_ids.shape  # C choices

        def flat(x):  # (B, C, T) -> (B * C, T); (1, T) or (T,) position or segment ids for every choice stay whole
            return None if x is None else x.reshape(-1, T)

        pooled = self.bert(flat(input_ids), flat(token_type_ids), flat(attention_mask), flat(position_ids)).pooler_output
        logits = self.classifier(self.dropout(pooled)).view(B, C)
        loss = F.cross_entropy(logits, labels.reshape(-1)) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the mean over each row's real tokens, [CLS] and [SEP] included (sentence-
    transformers' mean pooling)."""
    mask = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def in_batch_negatives_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, D) queries, (B, K, D) candidates, unit vectors, each query's own positive first: cross-entropy over
    `scale` x the cosine of each query with every candidate of the batch (the other queries' positives and every
    hard negative are its negatives): SimCSE's loss, and sentence-transformers' MultipleNegativesRankingLoss."""
    scores = scale * queries @ candidates.transpose(0, 1).reshape(-1, queries.shape[-1]).T  # positives first
    return F.cross_entropy(scores, torch.arange(len(queries), device=queries.device))


def cosent_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """CoSENT (Su 2022; sentence-transformers' CoSENTLoss) on (B, D) unit vectors and (B,) gold similarities: for
    every two pairs where i's gold score is below j's, the loss wants i's cosine below j's:
    log(1 + sum over such i, j of exp(scale (cos_i - cos_j)))."""
    cosine = scale * (a * b).sum(-1)
    below = labels[:, None] < labels[None, :]  # i's gold below j's
    differences = (cosine[:, None] - cosine[None, :])[below]
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences]), 0)


class BertForSentenceEmbedding(BertModel):
    """sentence-transformers' bi-encoder: a text's vector is the mean of the encoder's last layer over its tokens,
    two texts are as similar as the cosine of their vectors. No head: the folder it saves is a plain encoder
    (architectures BertModel, as all-MiniLM-L6-v2's), with sentence-transformers' module files beside it. The pooler
    is carried along frozen and unused, so that the folder holds every weight transformers' BertModel reads.

    Trained on (B, K, T) inputs, K texts per example, each encoded alone: with `labels` (a gold similarity per
    pair, K = 2) by CoSENT; without, by in-batch negatives: text 0 is the query, text 1 its positive, any further
    texts hard negatives (the same text twice is SimCSE: two dropout masks are the two views). (B, T) inputs give
    the vectors, `embeddings`."""

    trained_prefixes = ()  # under LoRA, no head trains: the pooler stays frozen
    saved_architecture = "BertModel"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.pooler.requires_grad_(False)
        self.scale = 20.0  # the cosines' multiplier in the losses (SimCSE's temperature 0.05)

    def embed(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, layout = self.encode(input_ids, token_type_ids, attention_mask, position_ids)
        return mean_pool(layout.pad(hidden), attention_mask)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, labels=None):
        if input_ids.ndim == 2:
            return ModelOutput(embeddings=self.embed(input_ids, token_type_ids, attention_mask, position_ids))
        B, K, T = input_ids.shape

        def flat(x):  # (B, K, T) -> (B * K, T), as multiple choice's
            return None if x is None else x.reshape(-1, T)

        vectors = self.embed(flat(input_ids), flat(token_type_ids), flat(attention_mask), flat(position_ids))
        vectors = F.normalize(vectors.float(), dim=-1).view(B, K, -1)
        if labels is not None:
            loss = cosent_loss(vectors[:, 0], vectors[:, 1], labels.float(), self.scale)
        else:
            loss = in_batch_negatives_loss(vectors[:, 0], vectors[:, 1:], self.scale)
        return ModelOutput(loss=loss, embeddings=vectors)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """The encoder's folder, and sentence-transformers' files that read it as this model does."""
        from bertkit.checkpoint import save_sentence_transformers_files

        super().save_pretrained(directory, tokenizer)
        save_sentence_transformers_files(directory, self.config.hidden_size, self.config.max_position_embeddings)


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        BertModel,
        BertForPreTraining,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForQuestionAnswering,
        BertForTokenClassification,
        BertForMultipleChoice,
        BertForSentenceEmbedding,
    )
}


COMPILE_MODES = {  # mode -> torch.compile options
    "dynamic": dict(dynamic=True),  # one graph for every token count (the packed count changes every batch)
    "static": dict(dynamic=False),  # a graph per shape: for padded batches of bucketed lengths
}


def compile_blocks(model: nn.Module, mode: str = "dynamic") -> nn.Module:
    """torch.compile every encoder block in place: "dynamic" shapes (the packed token count changes every batch), or
    "static", a graph per shape, which keeps batches padded (Kernels(packing="never")) so that shapes repeat: give it
    bucketed lengths (--pad-to-multiple-of); or, with Kernels(pack_multiple=...), keeps them packed with the token
    count rounded up (torch.compile recompiles at most 8 times by default: choose a multiple that leaves fewer
    counts). On an H200, base pretraining at length 128 in bf16: static 1.26x eager (CUDA graphs on top of it added
    nothing and were removed); dynamic did not pay on an H100 (benchmarks/RESULTS.md).

    Compiling the blocks rather than the whole model keeps the data-dependent parts (which tokens are real, which
    are masked) in eager mode, so one compiled graph serves every batch; parameter names, and so checkpoints, are
    unchanged. The first step pays the compilation (tens of seconds; on CPU it needs a C++ compiler).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    for module in model.modules():
        if isinstance(module, BertLayer):
            module.compile(**COMPILE_MODES[mode])
        # a packed batch's token count is a new shape every batch, unless it is rounded up (Kernels.pack_multiple)
        if mode == "static" and isinstance(module, BertModel) and module.kernels.pack_multiple == 1:
            module.kernels = replace(module.kernels, packing="never")
    return model


def set_kernels(model: nn.Module, **choices) -> nn.Module:
    """Choose how every encoder in `model` computes (the fields of `Kernels`)."""
    for module in model.modules():
        if isinstance(module, BertModel):
            module.kernels = replace(module.kernels, **choices)
    return model


# The Linear layers of an encoder block, by the end of their names: what `add_lora` can adapt ("output.dense" is
# both the attention's output projection and the feed-forward network's, as in peft's suffix matching)
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def reinit_top_layers(model: BertPreTrainedModel, layers: int) -> list[str]:
    """Draw the top `layers` encoder blocks afresh, as a new model's (and the pooler where the model has one that
    trains, which pretraining fitted to next-sentence prediction): Zhang et al. 2021, "Revisiting Few-sample BERT
    Fine-tuning", whose top blocks carry pretraining-specific features that fine-tuning on a small set then has to
    unlearn.
    Returns the re-drawn modules' names."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BertEncoder)]
    if len(blocks) != 1:
        raise BertkitError(f"re-initialising top layers: expected one encoder in the model, found {len(blocks)}")
    prefix, encoder = blocks[0]
    if not 0 <= layers <= len(encoder.layer):
        raise BertkitError(f"re-initialising the top {layers} layers of a {len(encoder.layer)}-layer model; expected "
                           f"0 to {len(encoder.layer)}")
    drawn = [f"{prefix}.layer.{i}" for i in range(len(encoder.layer) - layers, len(encoder.layer))]
    if layers:  # not a pooler that is carried along frozen and unused (sentence embeddings)
        drawn += [name for name, m in model.named_modules()
                  if isinstance(m, BertPooler) and m.dense.weight.requires_grad]
    for name in drawn:
        model.get_submodule(name).apply(model._init_module)
    return drawn


def add_lora(model: BertPreTrainedModel, rank: int, alpha: float, targets: tuple[str, ...]) -> list[str]:
    """LoRA in place: each encoder-block Linear whose name ends in one of `targets` becomes a LoraLinear, and only
    the LoRA matrices and the task head (the model's `trained_prefixes`: classifier, qa_outputs, a BiLSTM, the
    pooler a classifier reads; none for sentence embeddings) keep training; the embeddings, the blocks' weights and
    LayerNorms are frozen. Returns the adapted modules' names."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise BertkitError(f"LoRA targets {', '.join(unknown)}; expected some of {', '.join(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.Linear) and ".layer." in f".{name}" and ".encoder." in f".{name}"
                and name.endswith(tuple(f".{t}" for t in targets))):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, LoraLinear(module, rank, alpha))
            adapted.append(name)
    for name, p in model.named_parameters():
        if ".lora_" in name or name.startswith(model.trained_prefixes):
            p.requires_grad_(True)
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoraLinear's update into a plain Linear, in place: the model transformers (and bertkit) load,
    with nothing trainable frozen any more."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Set every dropout of the encoder and heads (hidden and attention) to p, leaving model.config as it is: a
    pretraining run without dropout still saves the preset's rates, which fine-tuning then uses."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, BertSelfAttention):
            module.dropout_p = p
    return model


def flops_per_token(config: BertConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per real token of the encoder (2 per multiply-add; x3 for forward + backward when training)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dense = 2 * (4 * H * H + 2 * H * I)  # QKV + output projection, FFN up + down
    attention = 2 * 2 * seq_len * H  # QK^T and attention x V
    return (3 if training else 1) * L * (dense + attention)


__all__ = [
    "ModelOutput",
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "BertForTokenClassification",
    "BertForMultipleChoice",
    "BertForSentenceEmbedding",
    "MODEL_CLASSES",
    "compile_blocks",
    "set_dropout",
    "flops_per_token",
]
