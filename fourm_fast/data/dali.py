"""A DALI pipeline over the shards: decode, crop and flip every aligned image modality alike, and hand
the token arrays along, in batches.

A batch (the same dict the torch backend yields; torch tensors):

  images[m]    [B, C, c, c] for each requested image modality, c the crop side (the image side without
               crop): rgb [B, 3] uint8, semseg [B, 1] uint8 class ids, edges [B, 1] uint8,
               depth [B, 1] float32 metres (the 16-bit millimetres / 1000, bit-equal to shards._decode),
               normal [B, 3] float32 (stored / 127.5 - 1, bit-equal to shards._decode)
  tokens[m]    int64 [B, g, g] VQ token grids, int64 [B, L] text ids (0-padded)
  lengths[m]   int64 [B] text lengths (EOS included)
  index        int64 [B] sample ids;  crop  int64 [B, 2] the window's top-left corner (y0, x0) in the
               stored image;  flip  bool [B] whether the sample was mirrored left-right

Images are on cuda:device_id with device_id set (decoders.image on device="mixed": JPEG on the GPU's
decoders, PNG decoded by the CPU codec and copied) and on the CPU otherwise; tokens, lengths and the
metadata stay on the CPU, where the token-budget sampler uses them.

Tokens describe the un-augmented image. A VQ code is not flip-equivariant (a mirrored patch is a
different code), and a crop cuts patches the encoder saw with their neighbours, so no honest
crop/flip of a token grid exists; the grids are passed unchanged, and `crop`/`flip` say what was done
to the pixels. Train on augmented pixels or on tokens, not on a mix that pretends they agree (re-run
the tokenizer on the augmented images if both are needed).

How. One external_source with a batch callback gives, per batch: the sample ids, the raw bytes of
each modality's files (os.read; no decoding in Python), the crop corners and the flip flags, the
token rows. Each modality is decoded (decoders.image: RGB for 3 channels, the stored single channel
with its 16 bits for depth) and then cropped, mirrored, transposed to CHW and cast in one
crop_mirror_normalize whose crop_pos_x/crop_pos_y/mirror are those same per-sample inputs, so every
modality of a sample gets the same window and the same flip; there is no resampling, hence no
interpolation that could mix class ids. Depth and normals become float by exact arithmetic.

The crop corners and flips come from EpochPlan (a pure function of seed and epoch, drawn with numpy
once per epoch), not from fn.random.*: a batch is then a function of (seed, epoch, position) alone,
so set_epoch resumes exactly, any thread count gives the same batches, and the torch backend draws
the very same windows (tested bit-equal). One shared input feeding every modality's crop is what
keeps them aligned, as a shared fn.random output would.

Epochs: iterating yields one epoch (len(loader) batches) and the pipeline, which prefetches, runs on
into the next; breaking off mid-epoch makes the next iteration rebuild the pipeline at the next
epoch. One iteration at a time per loader.
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorGPU, TensorListGPU
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from .loader import ShardBatches, ShardError, _check_int, mirror_normals
from .validate import FLOAT_IMAGES, IMAGE_SPECS, read_file


class DaliLoader(ShardBatches):
    """backend "dali" of build_loader; num_workers DALI CPU threads (at least 1), prefetch batches ahead."""

    backend = "dali"

    def __init__(self, root, batch_size, *, device_id: int | None = None, prefetch: int = 2, **kw):
        if device_id is not None:
            device_id = _check_int("device_id", device_id, 0)
            if not torch.cuda.is_available():
                raise ValueError(f"device_id={device_id}: no CUDA device is visible; device_id=None decodes on the CPU")
            if device_id >= torch.cuda.device_count():
                raise ValueError(f"device_id={device_id}: only {torch.cuda.device_count()} CUDA device(s) visible")
        self.prefetch = _check_int("prefetch", prefetch, 1)
        super().__init__(root, batch_size, **kw)
        self.device_id = device_id
        self.num_threads = max(1, self.num_workers)
        # file names are formatted per batch (a list of every path would cost memory on large shards)
        self._files = {m: (f"{self.root / m}/", f".{self.manifest['extensions'][m]}") for m in self.images}
        self._seqs = [m for m in self.token_names if self.token_kinds[m] == "sequence"]
        self._cropping = bool(self.images) and self.crop < self.size
        self._pipe = None
        self._pipe_next_epoch: int | None = None  # the epoch the live pipeline's next output starts, if at a boundary
        self._active = None

    # -- the pipeline --------------------------------------------------------------------------

    def _source(self, start_epoch: int):
        plan, nb = self.plan, self.plan.num_batches
        files = [self._files[m] for m in self.images]
        span = self.size - self.crop if self._cropping else 0
        arrays, lengths = self.token_arrays, self.token_lengths
        # locals only: a callback holding self would make loader -> pipeline -> callback -> loader
        # a cycle, and a dropped loader would keep its pipeline's threads until a full gc
        token_names, seqs = list(self.token_names), list(self._seqs)

        def batch(info):
            epoch, j = divmod(info.iteration, nb)
            idx, y0, x0, flip = plan.batch(start_epoch + epoch, j)
            meta = np.stack([idx, y0, x0, flip.astype(np.int64)], 1)
            # crop_mirror_normalize rounds pos * (size - crop): with pos = x0 / span that is x0 exactly
            window = [(y0 / span).astype(np.float32), (x0 / span).astype(np.float32)] if span else []
            encoded = [[np.frombuffer(read_file(f"{head}{i:06d}{tail}"), np.uint8) for i in idx]
                       for head, tail in files]
            toks = [arrays[m][idx] for m in token_names]
            lens = [lengths[m][idx] for m in seqs]
            mirror = [flip.astype(np.int32)] if files else []
            return (meta, *mirror, *window, *encoded, *toks, *lens)

        return batch

    def _build(self, start_epoch: int):
        n_window = 2 if self._cropping else 0
        n_mirror = 1 if self.images else 0
        n_out = 1 + n_mirror + n_window + len(self.images) + len(self.token_names) + len(self._seqs)
        decode_device = "cpu" if self.device_id is None else "mixed"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed & 0x7FFFFFFF, prefetch_queue_depth=self.prefetch)
        def graph():
            outs = fn.external_source(source=self._source(start_epoch), num_outputs=n_out, batch=True,
                                      batch_info=True)
            meta = outs[0]
            first = 1 + n_mirror + n_window
            images = []
            for m, enc in zip(self.images, outs[first:first + len(self.images)]):
                channels, bits, _ = IMAGE_SPECS[m]
                # adjust_orientation off: DALI would rotate an image by its EXIF orientation tag,
                # PIL (the torch backend) does not, and the other modalities of the sample (PNG,
                # untagged) would no longer line up with it
                img = fn.decoders.image(enc, device=decode_device,
                                        output_type=types.RGB if channels == 3 else types.ANY_DATA,
                                        dtype=types.UINT16 if bits == 16 else types.UINT8, adjust_orientation=False)
                kw = dict(mirror=outs[1], output_layout="CHW",
                          dtype=types.FLOAT if m in FLOAT_IMAGES else types.UINT8)
                if self._cropping:
                    kw.update(crop=(self.crop, self.crop), crop_pos_y=outs[1 + n_mirror], crop_pos_x=outs[2 + n_mirror],
                              rounding="round")
                img = fn.crop_mirror_normalize(img, **kw)
                if m == "depth":
                    img = img / FLOAT_IMAGES["depth"]         # float32 division, as numpy's in shards._decode
                elif m == "normal":
                    img = img / FLOAT_IMAGES["normal"] - 1.0
                images.append(img)
            return (meta, *images, *outs[first + len(self.images):])

        pipe = graph()
        pipe.build()
        return pipe

    # -- iteration -----------------------------------------------------------------------------

    def _to_torch(self, outs) -> dict:
        tensors = []
        for o in outs:
            t = o.as_tensor()
            gpu = isinstance(t, (TensorGPU, TensorListGPU))
            dest = torch.empty(t.shape(), dtype=to_torch_type[t.dtype],
                               device=f"cuda:{self.device_id}" if gpu else "cpu")
            feed_ndarray(t, dest, cuda_stream=torch.cuda.current_stream(dest.device) if gpu else None)
            tensors.append(dest)
        meta = tensors[0]
        k = 1 + len(self.images)
        toks = tensors[k:k + len(self.token_names)]
        lens = tensors[k + len(self.token_names):]
        images = dict(zip(self.images, tensors[1:k]))
        if "normal" in images:
            mirror_normals(images["normal"], meta[:, 3].bool())
        return {"images": images,
                "tokens": {m: t.long() for m, t in zip(self.token_names, toks)},
                "lengths": {m: t.long() for m, t in zip(self._seqs, lens)},
                "index": meta[:, 0].contiguous(), "crop": meta[:, 1:3].contiguous(), "flip": meta[:, 3].bool()}

    def _fail(self, epoch: int, j: int, err: Exception):
        """The pipeline raised: find the file PIL cannot decode either (this batch first, then those the
        pipeline had prefetched), else report the batch's samples."""
        self._pipe, self._pipe_next_epoch = None, None
        nb = self.plan.num_batches
        tried = []
        for k in range(self.prefetch + 1):
            e, jj = divmod(epoch * nb + j + k, nb)
            idx = self.plan.batch(e, jj)[0]
            self.decode_check([(m, int(i)) for i in idx for m in self.images])
            tried.extend(idx.tolist())
        raise ShardError(f"{self.root}: the DALI pipeline failed on batch {j} of epoch {epoch} (samples "
                         f"{sorted(set(tried))}), though PIL decodes all their files: {err}") from err

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self._pipe is None or self._pipe_next_epoch != epoch:
            self._pipe = None  # release the old pipeline's threads and buffers before building anew
            self._pipe = self._build(epoch)
        self._pipe_next_epoch = None
        me = self._active = object()
        for j in range(self.plan.num_batches):
            if self._active is not me:
                raise RuntimeError("another iteration over this DaliLoader started; iterate one epoch at a time")
            try:
                outs = self._pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI reports decoder failures as RuntimeError
                self._fail(epoch, j, e)
            batch = self._to_torch(outs)
            if j == self.plan.num_batches - 1:
                self._pipe_next_epoch = epoch + 1
            yield batch
