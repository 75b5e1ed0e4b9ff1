"""Numba kernels of the clean and window stages: arrays in, arrays out, no Python objects, no I/O.

A series is (tenant, device_id, metric); ``SeriesIndex`` maps series to dense int64 indices
(new devices may appear at any time), so every kernel works on flat arrays indexed by series.

Event time is per series: a series' watermark is its own max event time - lateness, advanced
reading by reading in arrival order, so a device with a skewed clock, or history replayed next to
live traffic, never makes another series' readings late, and every decision is a deterministic
function of the ordered input (the restart mechanism in ``aimass.agents.window`` relies on this).
A reading is late when its ts is below its series' watermark seen before it.

Windows: each window spec is (size, hop) with size a multiple of hop (tumbling: hop == size).
Per series and spec a ring of panes (hop-sized sub-windows) holds shifted sums, min, max,
first/last and bookkeeping; a window ending at pane ``p`` merges panes ``p-k+1 .. p`` and is
emitted once its series' watermark passes its end. EWMA and z-score use the series' window means
of the previous ``history`` hops (time-bounded, so a replay of that span rebuilds them exactly);
the z-score is 0 until at least ``min_history`` such means exist.

Idle series (``series_sweep``, run at each clock tick): a series without an accepted reading for
``idle`` ms of the tick clock has all its windows closed, and its watermark raised to the end of
the last of them (``floor``); one quiet for ``forget`` ms is forgotten (watermark, panes, history),
which bounds what a restart has to replay.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.typed import Dict

NO_TS = -(2 ** 62)  # "no reading seen yet" (far below any real ms timestamp, no overflow on minus)
NO_PANE = -(2 ** 62)  # empty pane slot / series without panes
FAR = 2 ** 62  # "no reading yet" for minimum searches (a constant: `2 ** 62` in a kernel is a loop)

# Integer fields of a pane (last axis of ``pane_i``).
P_ID, P_CNT, P_FIRST_TS, P_LAST_TS, P_MAX_RECV, P_FIRST_OFF = range(6)
PANE_INT_FIELDS = 6
# Float fields of a pane (last axis of ``pane_f``); sums are shifted by the pane's first value.
P_REF, P_S1, P_S2, P_MIN, P_MAX, P_FIRST_V, P_LAST_V = range(7)
PANE_FLOAT_FIELDS = 7

# Columns of emitted windows: out_i[:, O_*] int64, out_f[:, F_*] float64.
O_SERIES, O_START, O_END, O_COUNT, O_MAX_RECV, O_FIRST_OFF = range(6)
OUT_INT_COLS = 6
F_MEAN, F_MIN, F_MAX, F_STD, F_FIRST, F_LAST, F_RATE, F_EWMA, F_ZSCORE = range(9)
OUT_FLOAT_COLS = 9

# Clean verdicts per reading (int8); the stateless ones are set by the caller before the kernel.
OK, NON_FINITE, OUT_OF_RANGE, BAD_UNIT, FUTURE, DUPLICATE, LATE = range(7)
REASONS = ("ok", "non_finite", "out_of_range", "bad_unit", "future", "duplicate", "late")

# Kernels that only read and write the arrays they are given compile without numba's reference
# counting: with it, every array a compiled function binds costs an atomic incref/decref pair, which
# made closing a window (~11 arrays) cost 300-500 ns. Such a kernel must not allocate or return arrays.
NO_REFCOUNT = {"cache": True, "_nrt": False}

_TS_BITS = 42            # ms timestamps below 2**42 (year 2109) pack with a series index
_TS_MASK = (1 << _TS_BITS) - 1


# --- series index (outside numba) --------------------------------------------------------

class SeriesIndex:
    """Dense int64 index per series; indices never move, unseen series get the next one.

    Rows are matched by a 64-bit FNV-1a hash of (tenant, device_id, metric) computed in numba
    (a collision needs ~4 billion series for even odds); only unseen series cost Python work.
    """

    def __init__(self) -> None:
        self._index = Dict.empty(key_type=types.int64, value_type=types.int64)
        self._parts: tuple[list[str], list[str], list[str]] = ([], [], [])
        self._columns: tuple[pa.Array, ...] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, tenant: pa.Array, device_id: pa.Array, metric: pa.Array) -> np.ndarray:
        """Index of every row's series, registering unseen ones."""
        hashes = np.full(len(tenant), _FNV_OFFSET, np.int64)
        for column in (tenant, device_id, metric):
            offsets, data = _string_buffers(column)
            _hash_strings(offsets, data, hashes)
        indices = np.empty(len(hashes), np.int64)
        new_rows = _map_series(hashes, self._index, indices)
        if len(new_rows):
            for part, column in zip(self._parts, (tenant, device_id, metric)):
                part.extend(column.take(pa.array(new_rows)).to_pylist())
            self._columns = None
        return indices

    def columns(self, indices: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
        """(tenant, device_id, metric) string arrays of the given series indices."""
        if self._columns is None:
            self._columns = tuple(pa.array(part, pa.string()) for part in self._parts)
        return tuple(col.take(indices) for col in self._columns)


_FNV_OFFSET = np.int64(-3750763034362895579)  # 14695981039346656037 as int64
_FNV_PRIME = 1099511628211


def _string_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bytes) of a string column without copying the strings."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        column = pc.fill_null(column, "")
    _, offsets, data = column.buffers()
    width = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width)[column.offset:column.offset + len(column) + 1]
    return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8))


@njit(**NO_REFCOUNT)
def _hash_strings(offsets, data, hashes):
    """Fold each row's string (then a separator) into its running FNV-1a hash."""
    for i in range(hashes.shape[0]):
        h = hashes[i]
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ data[j]) * _FNV_PRIME
        hashes[i] = (h ^ 0xFF) * _FNV_PRIME


@njit(cache=True)
def _map_series(hashes, index, out):
    """Dense index of every hash (new hashes get the next one); returns the rows of new series."""
    new_rows = []
    for i in range(hashes.shape[0]):
        idx = index.get(hashes[i], -1)
        if idx < 0:
            idx = len(index)
            index[hashes[i]] = idx
            new_rows.append(i)
        out[i] = idx
    result = np.empty(len(new_rows), np.int64)
    for j in range(len(new_rows)):
        result[j] = new_rows[j]
    return result


def grow(array: np.ndarray, rows: int, fill) -> np.ndarray:
    """``array`` with at least ``rows`` rows (doubling), new rows set to ``fill``."""
    if array.shape[0] >= rows:
        return array
    bigger = np.full((max(rows, 2 * array.shape[0]),) + array.shape[1:], fill, dtype=array.dtype)
    bigger[:array.shape[0]] = array
    return bigger


# --- clean: dedup and lateness --------------------------------------------------------------

DEDUP_GENERATIONS = 4  # the dedup horizon is covered by this many closed generations, plus the filling one
SPARE_SLOTS_PER_READING = 8  # slots of the next generation's table zeroed per reading checked ...
SPARE_SLOTS_PER_RECORD = 1 << 17  # ... and at least 1 MB per record: it is ready before it is due
_NO_TABLE = np.zeros(1, np.int64)  # stands in for a generation not opened yet (never written)


class DedupSet:
    """The dedup set of one partition: the packed (series, ts) + 1 keys of the readings accepted
    within the horizon, in generations of horizon / DEDUP_GENERATIONS of event time.

    Each generation is an open-addressing hash table (numpy, linear probing; 0 = free slot). A
    generation is dropped whole once every reading in it is past the horizon, so expiry costs
    nothing: the one table with a full rebuild it replaced stalled its partition for 0.4-1.2 s
    per minute at 12k readings/s with a 600 s horizon. A new generation is sized from the last
    one, so at a steady rate nothing is ever rehashed, and its table is zeroed a slice per record
    beforehand (``spare``). ``newest`` (per series, the newest ts accepted) lets in-order readings,
    nearly all of them, skip the lookups.
    """

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self.span_ms = -(-horizon_ms // DEDUP_GENERATIONS)  # rounded up: G spans cover the horizon
        self.tables = [np.zeros(_capacity(0), np.int64)]   # oldest first; the last one is filling
        self.counts = [0]
        self.first_offsets = [-1]                          # Kafka offset of each one's first reading
        self.opened_at = NO_TS                             # max_ts when the filling one opened
        self.newest = np.full(1024, NO_TS, np.int64)
        self.spare: np.ndarray | None = None               # the next generation's table ...
        self.spare_zeroed = 0                              # ... zeroed up to here

    def check(self, series: np.ndarray, ts: np.ndarray, offset: int, verdict: np.ndarray, max_ts: int,
              max_ts_offset: int, lateness_ms: int) -> tuple[int, int]:
        """Mark duplicates and late readings of one record (Kafka ``offset``) in ``verdict``, remember
        the accepted ones; returns the new (max_ts, offset of the record that set it)."""
        self._rotate(max_ts)
        if len(series):
            self.newest = grow(self.newest, int(series.max()) + 1, NO_TS)
        self._reserve(len(series))
        older = self.tables[-2::-1] + [_NO_TABLE] * (DEDUP_GENERATIONS + 1 - len(self.tables))
        added, max_ts, max_ts_offset = clean_update(
            series, ts, offset, verdict, self.tables[-1], *older, self.newest, max_ts, max_ts_offset,
            lateness_ms, self.horizon_ms)
        if added and self.first_offsets[-1] < 0:
            self.first_offsets[-1] = offset
        self.counts[-1] += added
        self._prepare_spare(max(SPARE_SLOTS_PER_RECORD, SPARE_SLOTS_PER_READING * len(series)))
        return max_ts, max_ts_offset

    def live_offset(self) -> int:
        """Oldest Kafka offset a reading still held came from (-1: none): a restart point for the set."""
        held = [o for o in self.first_offsets if o >= 0]
        return min(held) if held else -1

    def _rotate(self, max_ts: int) -> None:
        """Open a new generation once event time moved a span on; drop the one past the horizon.

        The generation dropped closed G rotations ago, when max_ts was at least its every ts; each
        rotation since moved max_ts more than a span on, so all its readings are past the horizon.
        """
        if self.opened_at == NO_TS:
            self.opened_at = max_ts
        if max_ts == NO_TS or max_ts - self.opened_at <= self.span_ms:
            return
        capacity, dropped = _capacity(self.counts[-1]), None
        if len(self.tables) == DEDUP_GENERATIONS + 1:
            dropped = self.tables.pop(0)
            del self.counts[0], self.first_offsets[0]
        if self.spare is not None and self.spare.shape[0] >= capacity:
            table = self.spare
            table[self.spare_zeroed:] = 0  # usually zeroed already
        else:
            table = np.zeros(capacity, np.int64)
            table.fill(0)  # map every page in one pass, not a page fault per insert
        self.spare, self.spare_zeroed = dropped, 0  # its pages are mapped: zeroing them is cheap
        self.tables.append(table)
        self.counts.append(0)
        self.first_offsets.append(-1)
        self.opened_at = max_ts

    def _prepare_spare(self, slots: int) -> None:
        """Zero ``slots`` more of the next generation's table. Allocating and first touching a table at
        rotation (128 MB at 23k readings/s per partition) stalled the partition 50-450 ms on this kind
        of VM, where every first touch of a page is a costly fault."""
        wanted = _capacity(max(self.counts[-1], self.counts[-2] if len(self.counts) > 1 else 0))
        if self.spare is None or not wanted <= self.spare.shape[0] <= 4 * wanted:
            self.spare, self.spare_zeroed = np.zeros(wanted, np.int64), 0  # nothing mapped yet
        if self.spare_zeroed < self.spare.shape[0]:
            self.spare[self.spare_zeroed:self.spare_zeroed + slots] = 0
            self.spare_zeroed += slots

    def _reserve(self, more: int) -> None:
        """Keep the filling generation at load <= 1/2 after ``more`` insertions (rehash into a larger one)."""
        if 2 * (self.counts[-1] + more) > self.tables[-1].shape[0]:
            self.tables[-1] = _rehash(self.tables[-1], _capacity(self.counts[-1] + more))


def _capacity(entries: int) -> int:
    """A power of two with room for half again as many entries at load <= 1/2, so a generation
    like the last one is never rehashed."""
    return max(1 << 12, 1 << int(3 * entries).bit_length())


@njit(**NO_REFCOUNT)
def _slot(keys, key):
    """Slot of ``key`` in the table, or the free slot where it would go."""
    mask = keys.shape[0] - 1
    # murmur3's 64-bit finalizer. The readings of one timestamp have keys that differ only in their
    # high (series) bits, which a multiply alone never carries down into the slot bits: they all
    # collided (one probe chain per timestamp, ~1 ms per 50-reading batch once the table held 1M).
    h = key ^ (key >> 33)
    h *= -49064778989728563   # 0xff51afd7ed558ccd
    h ^= h >> 33
    h *= -4265267296055464877  # 0xc4ceb9fe1a85ec53
    h ^= h >> 33
    i = h & mask
    while keys[i] != 0 and keys[i] != key:
        i = (i + 1) & mask
    return i


@njit(**NO_REFCOUNT)
def _holds(keys, key):
    return keys[_slot(keys, key)] == key


@njit(cache=True)
def _rehash(keys, capacity):
    """The entries of ``keys`` in a new table of ``capacity`` slots."""
    new_keys = np.zeros(capacity, np.int64)
    for k in keys:
        if k != 0:
            new_keys[_slot(new_keys, k)] = k
    return new_keys


@njit(**NO_REFCOUNT)
def clean_update(series, ts, offset, verdict, filling, older1, older2, older3, older4, newest, max_ts,
                 max_ts_offset, lateness_ms, horizon_ms):
    """Mark duplicates (within the horizon) and late readings in ``verdict``, both measured from the
    reading's own series' newest accepted ts (``newest``), add the accepted readings to ``filling``;
    returns (readings added, new partition max_ts, offset that set it). The partition max_ts only
    paces the dedup generations. Rejected readings are skipped. ``filling`` needs room for every
    reading of the batch."""
    added = 0
    for i in range(series.shape[0]):
        if verdict[i] != OK:
            continue
        t = ts[i]
        s = series[i]
        key = ((s << _TS_BITS) | (t & _TS_MASK)) + 1
        # a reading newer than any accepted for its series cannot be a copy of one
        seen = t <= newest[s] and (_holds(filling, key) or _holds(older1, key) or _holds(older2, key)
                                   or _holds(older3, key) or _holds(older4, key))
        if seen and t >= newest[s] - horizon_ms:
            verdict[i] = DUPLICATE
        elif t < newest[s] - lateness_ms:
            verdict[i] = LATE
        else:  # not seen (a reading past the horizon is past the lateness too: horizon >= lateness)
            filling[_slot(filling, key)] = key
            added += 1
            if t > newest[s]:
                newest[s] = t
            if t > max_ts:
                max_ts = t
                max_ts_offset = offset
    return added, max_ts, max_ts_offset


# --- window: per-series pane rings ----------------------------------------------------------

PREFETCH_AHEAD = 8  # series: the close sweep asks for a series' state this many series early


@intrinsic
def _prefetch(typingctx, array, index):
    """Start loading the cache line holding ``array[index]`` (index: a tuple); never faults."""
    def codegen(context, builder, sig, args):
        array_type, index_type = sig.args
        array_struct = context.make_array(array_type)(context, builder, args[0])
        indices = cgutils.unpack_tuple(builder, args[1], len(index_type))
        pointer = cgutils.get_item_pointer(context, builder, array_type, array_struct, indices)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        llvm_prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read access, keep in all cache levels, data cache
        builder.call(llvm_prefetch, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@njit(inline="always", **NO_REFCOUNT)
def _prefetch_series(s, pane_i, pane_f, next_close, hist_mean, hist_end, hist_off, hist_n, history):
    """Prefetch what closing series s reads: its next pane and its newest history slots."""
    slot = next_close[s] & (pane_i.shape[1] - 1)
    _prefetch(pane_i, (s, slot, 0))
    _prefetch(pane_f, (s, slot, 0))
    mask = hist_mean.shape[1] - 1
    newest = hist_n[s]
    _prefetch(hist_end, (s, newest & mask))
    _prefetch(hist_off, (s, newest & mask))
    for j in range(newest - min(newest, mask + 1, history + 1), newest + 8, 8):
        _prefetch(hist_mean, (s, j & mask))


@njit(inline="always", **NO_REFCOUNT)
def _emit_window(s, p, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f,
                 hist_mean, hist_end, hist_off, hist_n, out_i, out_f, n_out, counters):
    """Merge panes p-k+1..p of series s into one window row; returns the new row count."""
    ring = pane_i.shape[1]
    n = 0
    ref = 0.0
    s1 = 0.0
    s2 = 0.0
    mn = math.inf
    mx = -math.inf
    first_ts = FAR
    last_ts = NO_TS
    first_v = math.nan
    last_v = math.nan
    max_recv = NO_TS
    first_off = FAR
    for j in range(p - k + 1, p + 1):
        slot = j & (ring - 1)
        if pane_i[s, slot, P_ID] != j or pane_i[s, slot, P_CNT] == 0:
            continue
        c = pane_i[s, slot, P_CNT]
        r = pane_f[s, slot, P_REF]
        a1 = pane_f[s, slot, P_S1]
        a2 = pane_f[s, slot, P_S2]
        if n == 0:
            ref = r
        d = r - ref  # re-shift this pane's sums onto the window's reference value
        s2 += a2 + 2.0 * d * a1 + c * d * d
        s1 += a1 + c * d
        n += c
        mn = min(mn, pane_f[s, slot, P_MIN])
        mx = max(mx, pane_f[s, slot, P_MAX])
        if pane_i[s, slot, P_FIRST_TS] < first_ts:
            first_ts = pane_i[s, slot, P_FIRST_TS]
            first_v = pane_f[s, slot, P_FIRST_V]
        if pane_i[s, slot, P_LAST_TS] >= last_ts:
            last_ts = pane_i[s, slot, P_LAST_TS]
            last_v = pane_f[s, slot, P_LAST_V]
        max_recv = max(max_recv, pane_i[s, slot, P_MAX_RECV])
        counters[1] += 1
        first_off = min(first_off, pane_i[s, slot, P_FIRST_OFF])
    if n == 0:
        return n_out
    inv_n = 1.0 / n
    mean = ref + s1 * inv_n
    var = s2 * inv_n - (s1 * inv_n) * (s1 * inv_n)
    std = math.sqrt(var) if var > 0.0 else 0.0
    rate = (last_v - first_v) / ((last_ts - first_ts) / 1000.0) if last_ts > first_ts else 0.0

    # History: this series' window means that ended within the previous `history` hops. Means are
    # stored in emission order (ends increasing), so those are the newest ones of the ring.
    mask = hist_mean.shape[1] - 1  # capacities are powers of two
    newest = hist_n[s]
    first = newest - min(newest, mask + 1)
    while first < newest and hist_end[s, first & mask] < p - history:
        first += 1
    h_n = newest - first
    h_ref = 0.0  # sums shifted by the first mean: identical means give exactly zero spread
    h_s1 = 0.0
    h_s2 = 0.0
    ewma = mean
    if h_n > 0:
        # EWMA seeded with the oldest mean, as weights: newest x gets alpha, each older one (1 - alpha)
        # times less, the seed what is left. Newest first, so no step waits on the previous EWMA.
        h_ref = hist_mean[s, first & mask]
        decay = 1.0 - alpha
        weight = 1.0
        weighted = 0.0
        for j in range(newest - 1, first, -1):
            x = hist_mean[s, j & mask]
            weighted += weight * x
            weight *= decay
            h_s1 += x - h_ref
            h_s2 += (x - h_ref) * (x - h_ref)
        ewma = alpha * mean + decay * (alpha * weighted + weight * h_ref)
    zscore = 0.0  # fewer means than min_history give too noisy a spread (|z| > 6 on clean data)
    if h_n >= min_history:
        h_var = (h_s2 - h_s1 * h_s1 / h_n) / (h_n - 1)
        if h_var > 1e-24:
            zscore = (mean - (h_ref + h_s1 / h_n)) / math.sqrt(h_var)
    pos = newest & mask
    hist_mean[s, pos] = mean
    hist_end[s, pos] = p
    hist_off[s, pos] = first_off
    hist_n[s] = newest + 1

    end = (p + 1) * hop_ms
    out_i[n_out, O_SERIES] = s
    out_i[n_out, O_START] = end - size_ms
    out_i[n_out, O_END] = end
    out_i[n_out, O_COUNT] = n
    out_i[n_out, O_MAX_RECV] = max_recv
    out_i[n_out, O_FIRST_OFF] = first_off
    out_f[n_out, F_MEAN] = mean
    out_f[n_out, F_MIN] = mn
    out_f[n_out, F_MAX] = mx
    out_f[n_out, F_STD] = std
    out_f[n_out, F_FIRST] = first_v
    out_f[n_out, F_LAST] = last_v
    out_f[n_out, F_RATE] = rate
    out_f[n_out, F_EWMA] = ewma
    out_f[n_out, F_ZSCORE] = zscore
    return n_out + 1


@njit(inline="always", **NO_REFCOUNT)
def _close_series(s, target, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f, next_close, last_pane,
                  hist_mean, hist_end, hist_off, hist_n, out_i, out_f, n_out, counters):
    """Emit every window of series s ending at panes next_close[s]..target, in order."""
    ring = pane_i.shape[1]
    p = next_close[s]
    while p <= target:
        if p - k + 1 > last_pane[s]:
            p = target + 1  # no data left in any window up to target
            break
        before = n_out
        n_out = _emit_window(s, p, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f,
                             hist_mean, hist_end, hist_off, hist_n, out_i, out_f, n_out, counters)
        if n_out == before:
            # Empty window: jump to the next pane holding data (windows in between are empty too).
            nxt = FAR
            for slot in range(ring):
                pid = pane_i[s, slot, P_ID]
                if pid > p and pane_i[s, slot, P_CNT] > 0 and pid < nxt:
                    nxt = pid
            p = nxt if nxt <= target else target + 1
        else:
            p += 1
    next_close[s] = p
    return n_out


@njit(**NO_REFCOUNT)
def series_event_time(series, ts, offset, lateness_ms, clock, series_max, floor, active_clock, active_at, late):
    """Per reading in arrival order: late (below its series' watermark or idle floor: ``late[i]`` set)
    or accepted (advances its series' max ts, marks the series active at ``clock`` by record
    ``offset``). ``late`` must be all False on entry; returns how many readings are late."""
    n_late = 0
    for i in range(series.shape[0]):
        s = series[i]
        t = ts[i]
        if t < series_max[s] - lateness_ms or t < floor[s]:
            late[i] = True
            n_late += 1
            continue
        if t > series_max[s]:
            series_max[s] = t
        active_clock[s] = clock
        active_at[s] = offset
    return n_late


@njit(**NO_REFCOUNT)
def series_sweep(clock, idle_ms, forget_ms, hops, ks, series_max, floor, active_clock, active_at, n_series,
                 to_close, to_forget):
    """At a clock tick: list the series idle for ``idle_ms`` (their windows are to be closed; their
    floor rises to the end of their last window over every spec) and those quiet for ``forget_ms``
    (their series state is reset here, the caller resets their panes). A series first seen since
    the last tick counts as active at this one. Returns (closing, forgotten)."""
    n_close = 0
    n_forget = 0
    for s in range(n_series):
        if series_max[s] == NO_TS:
            continue
        since = active_clock[s]
        if since == NO_TS:
            active_clock[s] = clock
            continue
        if since + idle_ms <= clock and floor[s] <= series_max[s]:
            to_close[n_close] = s
            n_close += 1
            reach = NO_TS
            for j in range(hops.shape[0]):
                reach = max(reach, (series_max[s] // hops[j] + ks[j]) * hops[j])
            floor[s] = reach
        if since + forget_ms <= clock:
            to_forget[n_forget] = s
            n_forget += 1
            series_max[s] = NO_TS
            floor[s] = NO_TS
            active_clock[s] = NO_TS
            active_at[s] = -1
    return n_close, n_forget


@njit(**NO_REFCOUNT)
def window_update(series, ts, value, recv, offset, late, series_max, lateness_ms, hop_ms, size_ms,
                  k, alpha, history, min_history, pane_i, pane_f, next_close, last_pane,
                  hist_mean, hist_end, hist_off, hist_n, out_i, out_f, counters):
    """Add a batch's accepted readings (``late`` from ``series_event_time``) to the pane rings and
    emit the windows their series' watermarks (``series_max`` after the batch) closed.

    Returns the rows written to out_i/out_f. ``counters`` = [panes created, pane uses by emitted
    windows]: every pane is used by k windows, so out_* need k * (created + batch) - uses rows.
    """
    mask = pane_i.shape[1] - 1  # ring sizes are powers of two
    n_out = 0
    for i in range(series.shape[0]):
        if late[i]:
            continue
        t = ts[i]
        v = value[i]
        if not math.isfinite(v):
            continue  # advanced the watermark like upstream, but is not a measurement
        s = series[i]
        q = last_pane[s]  # most readings fall in the series' latest pane: skip the division
        if q == NO_PANE or t < q * hop_ms or t >= (q + 1) * hop_ms:
            q = t // hop_ms
        slot = q & mask
        if pane_i[s, slot, P_ID] != q:
            old = pane_i[s, slot, P_ID]
            if old != NO_PANE and old >= next_close[s] - (k - 1):
                # The slot still holds a needed pane; the ring is sized so that the series'
                # watermark (at least this reading's ts - lateness) has passed its windows.
                n_out = _close_series(s, old + k - 1, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f,
                                      next_close, last_pane, hist_mean, hist_end, hist_off, hist_n,
                                      out_i, out_f, n_out, counters)
            pane_i[s, slot, P_ID] = q
            pane_i[s, slot, P_CNT] = 0
            pane_i[s, slot, P_FIRST_TS] = FAR
            pane_i[s, slot, P_LAST_TS] = NO_TS
            pane_i[s, slot, P_MAX_RECV] = NO_TS
            pane_i[s, slot, P_FIRST_OFF] = offset
            pane_f[s, slot, P_REF] = v
            pane_f[s, slot, P_S1] = 0.0
            pane_f[s, slot, P_S2] = 0.0
            pane_f[s, slot, P_MIN] = math.inf
            pane_f[s, slot, P_MAX] = -math.inf
            counters[0] += 1
            if next_close[s] == NO_PANE or q < next_close[s]:
                next_close[s] = q  # at or above its watermark and floor, so no window over pane q was emitted yet
            if q > last_pane[s]:
                last_pane[s] = q
        d = v - pane_f[s, slot, P_REF]
        pane_i[s, slot, P_CNT] += 1
        pane_f[s, slot, P_S1] += d
        pane_f[s, slot, P_S2] += d * d
        if v < pane_f[s, slot, P_MIN]:
            pane_f[s, slot, P_MIN] = v
        if v > pane_f[s, slot, P_MAX]:
            pane_f[s, slot, P_MAX] = v
        if t < pane_i[s, slot, P_FIRST_TS]:
            pane_i[s, slot, P_FIRST_TS] = t
            pane_f[s, slot, P_FIRST_V] = v
        if t >= pane_i[s, slot, P_LAST_TS]:
            pane_i[s, slot, P_LAST_TS] = t
            pane_f[s, slot, P_LAST_V] = v
        if recv[i] > pane_i[s, slot, P_MAX_RECV]:
            pane_i[s, slot, P_MAX_RECV] = recv[i]
    # Panes ending at or before their series' watermark are final: close the batch's series up to it.
    for i in range(series.shape[0]):
        s = series[i]
        if next_close[s] != NO_PANE:
            target = (series_max[s] - lateness_ms) // hop_ms - 1
            if next_close[s] <= target:
                n_out = _close_series(s, target, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f,
                                      next_close, last_pane, hist_mean, hist_end, hist_off, hist_n,
                                      out_i, out_f, n_out, counters)
    return n_out


@njit(**NO_REFCOUNT)
def window_flush(chosen, hop_ms, size_ms, k, alpha, history, min_history, pane_i, pane_f, next_close, last_pane,
                 hist_mean, hist_end, hist_off, hist_n, out_i, out_f, counters):
    """Close every remaining window of the ``chosen`` series (idle ones, or all at the end of an
    offline history); returns rows written."""
    n_out = 0
    for j in range(chosen.shape[0]):
        s = chosen[j]
        if j + PREFETCH_AHEAD < chosen.shape[0]:
            _prefetch_series(chosen[j + PREFETCH_AHEAD], pane_i, pane_f, next_close, hist_mean, hist_end, hist_off,
                             hist_n, history)
        if next_close[s] != NO_PANE:
            n_out = _close_series(s, last_pane[s] + k - 1, hop_ms, size_ms, k, alpha, history, min_history,
                                  pane_i, pane_f, next_close, last_pane, hist_mean, hist_end, hist_off, hist_n,
                                  out_i, out_f, n_out, counters)
    return n_out


@njit(**NO_REFCOUNT)
def window_forget(chosen, pane_i, next_close, last_pane, hist_n):
    """Drop the panes and window history of the ``chosen`` series (closed before)."""
    for j in range(chosen.shape[0]):
        s = chosen[j]
        for slot in range(pane_i.shape[1]):
            pane_i[s, slot, P_ID] = NO_PANE
        next_close[s] = NO_PANE
        last_pane[s] = NO_PANE
        hist_n[s] = 0


@njit(**NO_REFCOUNT)
def window_live_offset(pane_i, next_close, hist_end, hist_off, hist_n, n_series, k, history):
    """Smallest Kafka offset whose readings the state still needs (open panes, panes later
    windows reuse, history means later windows read); -1 when none."""
    lowest = -1
    ring = pane_i.shape[1]
    cap = hist_end.shape[1]
    for s in range(n_series):
        for slot in range(ring):
            pid = pane_i[s, slot, P_ID]
            if pid != NO_PANE and pid >= next_close[s] - (k - 1):
                off = pane_i[s, slot, P_FIRST_OFF]
                if lowest < 0 or off < lowest:
                    lowest = off
        for j in range(min(hist_n[s], cap)):
            if hist_end[s, j] >= next_close[s] - history:  # a later window (ending >= next_close) reads it
                off = hist_off[s, j]
                if lowest < 0 or off < lowest:
                    lowest = off
    return lowest
