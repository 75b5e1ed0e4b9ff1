"""Device-level detector: all metrics of one device at one window, against the device's normal state.

Metrics of one device move together (a pump's flow, pressure and current), so a window can be
abnormal as a whole while every metric alone looks plausible. Per device, ``device_step`` keeps:

- **Warm-up** (the first ``device_warmup_windows`` complete windows, equal weights): the window
  means are collected; then the model is fitted once. A metric whose window means vary far more
  than its own within-window noise explains (variance ratio above ``device_slow_ratio``: a
  temperature drifting with the machine's heat) is a *slow* metric and is left out of the level
  model, which it would otherwise keep alarming long after an incident. The mean ``m`` and the
  covariance ``C`` (shrunk toward its diagonal by ``device_shrink``) of the fast metrics give the
  Mahalanobis distance ``D = rᵀ C⁻¹ r`` of a window's residual ``r = x - m``.
- **Calibration**: ``q`` = the chi-square 0.99 quantile for the number of metrics, scaled by the
  mean leave-one-out distance of the warm-up windows (the distance a *new* normal window gets,
  which 40 windows estimate far better than their own 99th percentile); score = 1 - 0.5^(D/q).
- **Incident state**: open when the score passes ``device_alarm_score``, closed after
  ``device_clear_windows`` quiet windows (the default rule uses the same settings). While open, a
  window that moved away from the incident's reference by more than ``device_reopen_distance`` q
  (and at least ``device_reopen_s`` after the last move) is a **regime change** of the incident
  (``regime_change``: the rule re-opens the alarm, so the operator sees that it changed).
- **Slow adaptation**: only quiet windows with D <= q move ``m`` and ``C`` (time constant
  ``device_adapt_s``), so a developing anomaly is never learned as normal.

Rows of one device and window may come in several batches: a window is judged when all of the
device's known metrics arrived, or, with what arrived, when the device's next window starts.
References: MSET / Hotelling T² monitoring; SKAB (Katser & Kozitsin, 2020) for the evaluation.
A device of one metric has no device model (nothing to combine: its series scores judge it).
Known weakness: a metric that only becomes slow (or fast) after the warm-up keeps its warm-up
treatment, one that first reports after it is not in the model; an anomaly inside the warm-up is
learned as normal.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

MAX_METRICS = 16  # metrics of a device in its model; more are judged per series only
WARMUP_MAX = 256  # warm-up windows kept at most
CHI2_99 = np.array([6.635, 9.210, 11.345, 13.277, 15.086, 16.812, 18.475, 20.090, 21.666, 23.209,
                    24.725, 26.217, 27.688, 29.141, 30.578, 32.000])  # chi2.ppf(0.99, p), p = 1..16

# scalar state columns
READY, N_WARM, Q, ALARM, QUIET, REF_T, PEND_END, KNOWN, USED, HAS_LAST = range(10)
N_SCALARS = 10
FAST, SLOW = 1.0, 2.0  # ``use``: a metric modelled by its level / by its change from the previous window


def empty_state(n: int, warmup: int = 40) -> dict[str, np.ndarray]:
    """Device state arrays for ``n`` devices (leading dimension = device slot)."""
    m = MAX_METRICS
    return {"scalars": np.zeros((n, N_SCALARS)), "use": np.zeros((n, m)), "mean": np.zeros((n, m)),
            "ref": np.zeros((n, m)), "cov": np.zeros((n, m, m)), "prec": np.zeros((n, m, m)),
            "pend": np.zeros((n, m)), "pend_have": np.zeros((n, m)), "pend_noise": np.zeros((n, m)),
            "last": np.zeros((n, m)),
            "warm": np.zeros((n, min(warmup, WARMUP_MAX), m)), "noise": np.zeros((n, m))}


def grown(state: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``state`` with room for ``n`` devices (doubling)."""
    have = state["scalars"].shape[0]
    if have >= n:
        return state
    size = max(n, 2 * have, 64)
    out = {}
    for name, a in state.items():
        b = np.zeros((size,) + a.shape[1:], a.dtype)
        b[:have] = a
        out[name] = b
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a small symmetric positive-definite matrix (Gauss-Jordan, partial pivoting)."""
    n = a.shape[0]
    m = a.copy()
    inv = np.eye(n)
    for c in range(n):
        p = c + np.argmax(np.abs(m[c:, c]))
        if p != c:
            for j in range(n):
                m[c, j], m[p, j] = m[p, j], m[c, j]
                inv[c, j], inv[p, j] = inv[p, j], inv[c, j]
        d = m[c, c] if abs(m[c, c]) > 1e-300 else 1e-300
        for j in range(n):
            m[c, j] /= d
            inv[c, j] /= d
        for r in range(n):
            if r != c and m[r, c] != 0.0:
                f = m[r, c]
                for j in range(n):
                    m[r, j] -= f * m[c, j]
                    inv[r, j] -= f * inv[c, j]
    return inv


@njit(cache=True, nogil=True, error_model="numpy")
def shrunk_cov(x: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance shrunk toward its diagonal, floored) of the rows of ``x``."""
    n, p = x.shape
    mean = np.zeros(p)
    for i in range(n):
        for a in range(p):
            mean[a] += x[i, a]
    mean /= n
    cov = np.zeros((p, p))
    for i in range(n):
        for a in range(p):
            da = x[i, a] - mean[a]
            for b in range(a + 1):
                cov[a, b] += da * (x[i, b] - mean[b])
    for a in range(p):
        for b in range(a):
            cov[b, a] = cov[a, b]
    cov /= max(n - 1, 1)
    for a in range(p):
        cov[a, a] = max(cov[a, a], 1e-12 + 1e-9 * mean[a] * mean[a])
        for b in range(p):
            if a != b:
                cov[a, b] *= 1.0 - shrink
    return mean, cov


@njit(cache=True, nogil=True, error_model="numpy")
def mahalanobis(r: np.ndarray, prec: np.ndarray) -> float:
    """rᵀ P r."""
    return float(r @ prec @ r)


@njit(cache=True, nogil=True, error_model="numpy")
def _quadratic(r: np.ndarray, prec: np.ndarray, idx: np.ndarray) -> float:
    """rᵀ P r over the rows / columns ``idx`` of ``prec`` (``r`` already compact)."""
    total = 0.0
    for a in range(idx.size):
        row = 0.0
        for b in range(idx.size):
            row += prec[idx[a], idx[b]] * r[b]
        total += r[a] * row
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def _fit(sc, use, mean, cov, prec, warm, noise, d, n, slow_ratio, shrink):
    """End of warm-up: sort the metrics into fast (modelled by level) and slow (modelled by their
    change from the previous window), fit mean / covariance / normalizer of device ``d``."""
    known = int(sc[KNOWN])
    x = warm[d, :n, :known].copy()
    p = known
    sc[READY] = 1.0
    sc[USED] = p if p >= 2 else 0
    if p < 2:  # one metric: nothing to combine, its series scores judge it
        return
    f = np.empty((n - 1, p))  # the first window has no previous one: the features start at the second
    for j in range(p):
        between = np.var(x[:, j])
        within = noise[d, j] / n
        slow = between > slow_ratio * within + 1e-300
        use[d, j] = SLOW if slow else FAST
        for i in range(1, n):
            f[i - 1, j] = x[i, j] - x[i - 1, j] if slow else x[i, j]
    n = n - 1
    m, c = shrunk_cov(f, shrink)
    loo = 0.0
    keep = np.empty((n - 1, p))
    for i in range(n):
        k = 0
        for i2 in range(n):
            if i2 != i:
                keep[k] = f[i2]
                k += 1
        mi, ci = shrunk_cov(keep, shrink)
        loo += mahalanobis(f[i] - mi, inverse(ci))
    pr = inverse(c)
    mean[d, :] = 0.0
    cov[d, :, :] = 0.0
    prec[d, :, :] = 0.0
    mean[d, :p] = m  # every known metric is modelled (by level or by change): positions 0..p-1
    cov[d, :p, :p] = c
    prec[d, :p, :p] = pr
    # (error_model="numpy": a division by zero gives inf / NaN, never an exception in a worker)
    sc[Q] = max(CHI2_99[min(p, 16) - 1] * (loo / n) / p, 1e-12)  # a constant warm-up: any move is far


@njit(cache=True, nogil=True, error_model="numpy")
def _judge(sc, use, mean, ref, cov, prec, pend, pend_have, pend_noise, last, warm, noise, d, end,
           warmup, slow_ratio, shrink, alarm_score, clear_windows, reopen_distance, reopen_ms, a_ref, a_adapt):
    """Judge device ``d``'s pending window ending at ``end``: (score, D / q, regime change); NaN
    score in the warm-up or when a modelled metric is missing."""
    known = int(sc[KNOWN])
    complete = True
    for j in range(known):
        if pend_have[d, j] == 0.0:
            complete = False
    had_last = sc[HAS_LAST] > 0.0
    prev = last[d].copy()  # the previous complete window: slow metrics are judged by their change from it
    if complete:
        last[d] = pend[d]
        sc[HAS_LAST] = 1.0
    if sc[READY] == 0.0:
        if complete:
            n = int(sc[N_WARM])
            for j in range(known):
                warm[d, n, j] = pend[d, j]
                noise[d, j] += pend_noise[d, j]
            sc[N_WARM] = n + 1
            if n + 1 >= warmup:
                _fit(sc, use, mean, cov, prec, warm, noise, d, n + 1, slow_ratio, shrink)
        return np.nan, np.nan, False  # not judged while the model learns
    if not complete or not had_last or sc[USED] == 0.0:
        return np.nan, np.nan, False
    idx = np.empty(MAX_METRICS, np.int64)
    p = 0
    for j in range(MAX_METRICS):
        if use[d, j] > 0.0:
            if pend_have[d, j] == 0.0:
                return np.nan, np.nan, False
            idx[p] = j
            p += 1
    idx = idx[:p]
    f = np.empty(p)
    for a in range(p):
        j = idx[a]
        f[a] = pend[d, j] - prev[j] if use[d, j] == SLOW else pend[d, j]
    r = np.empty(p)
    for a in range(p):
        r[a] = f[a] - mean[d, idx[a]]
    dist = _quadratic(r, prec[d], idx) / sc[Q]
    score = 1.0 - 0.5 ** dist
    hot = score > alarm_score
    changed = False
    if sc[ALARM] == 0.0:
        if hot:
            sc[ALARM], sc[QUIET], sc[REF_T] = 1.0, 0.0, end
            for a in range(p):
                ref[d, idx[a]] = r[a]
    else:
        sc[QUIET] = 0.0 if hot else sc[QUIET] + 1.0
        if sc[QUIET] >= clear_windows:
            sc[ALARM] = 0.0
        else:
            moved = np.empty(p)
            for a in range(p):
                moved[a] = r[a] - ref[d, idx[a]]
            if _quadratic(moved, prec[d], idx) / sc[Q] > reopen_distance and end - sc[REF_T] >= reopen_ms:
                changed = True
                sc[REF_T] = end
                for a in range(p):
                    ref[d, idx[a]] = r[a]
            else:
                for a in range(p):
                    ref[d, idx[a]] += a_ref * moved[a]
    if sc[ALARM] == 0.0 and dist <= 1.0:  # learn only from clearly normal windows
        sub = np.empty((p, p))
        for a in range(p):
            mean[d, idx[a]] += a_adapt * r[a]
        for a in range(p):
            ra = f[a] - mean[d, idx[a]]
            for b in range(p):
                rb = f[b] - mean[d, idx[b]]
                cov[d, idx[a], idx[b]] = (1.0 - a_adapt) * cov[d, idx[a], idx[b]] + a_adapt * ra * rb
                sub[a, b] = cov[d, idx[a], idx[b]]
        pr = inverse(sub)
        for a in range(p):
            for b in range(p):
                prec[d, idx[a], idx[b]] = pr[a, b]
    return score, dist, changed


@njit(cache=True, nogil=True, error_model="numpy")
def device_kernel(devices, ends, pos, means, noise_of_mean, known, sc_all, use, mean, ref, cov, prec, pend,
                  pend_have, pend_noise, last, warm, noise, warmup, slow_ratio, shrink, alarm_score, clear_windows,
                  reopen_distance, reopen_ms, a_ref, a_adapt):
    """Per row: (judged window end or 0, score, D / q, regime change) of the device window it completed,
    and whether the device's fitted model judges the row's metric."""
    n = devices.size
    covered = np.zeros(n, np.bool_)
    judged = np.zeros(n, np.int64)
    score = np.full(n, np.nan)
    dist = np.full(n, np.nan)
    changed = np.zeros(n, np.bool_)
    for i in range(n):
        d, e, j = devices[i], ends[i], pos[i]
        sc = sc_all[d]
        if known[i] > sc[KNOWN]:
            if sc[READY] == 0.0:  # a new metric during warm-up: the warm-up restarts with it
                sc[N_WARM] = 0.0
                noise[d, :] = 0.0
            sc[KNOWN] = known[i]
        if j < 0 or e < sc[PEND_END]:
            continue  # a metric beyond MAX_METRICS, or a row of a window already judged
        covered[i] = sc[READY] > 0.0 and use[d, j] > 0.0
        if e > sc[PEND_END]:
            if sc[PEND_END] > 0 and pend_have[d].sum() > 0:  # the previous window, with what arrived
                score[i], dist[i], changed[i] = _judge(
                    sc, use, mean, ref, cov, prec, pend, pend_have, pend_noise, last, warm, noise, d, int(sc[PEND_END]),
                    warmup, slow_ratio, shrink, alarm_score, clear_windows, reopen_distance, reopen_ms, a_ref, a_adapt)
                judged[i] = int(sc[PEND_END])
            sc[PEND_END] = e
            pend_have[d, :] = 0.0
        pend[d, j], pend_have[d, j], pend_noise[d, j] = means[i], 1.0, noise_of_mean[i]
        if pend_have[d, :int(sc[KNOWN])].sum() >= sc[KNOWN]:
            score[i], dist[i], changed[i] = _judge(
                sc, use, mean, ref, cov, prec, pend, pend_have, pend_noise, last, warm, noise, d, e,
                warmup, slow_ratio, shrink, alarm_score, clear_windows, reopen_distance, reopen_ms, a_ref, a_adapt)
            judged[i] = e
            pend_have[d, :] = 0.0
            sc[PEND_END] = e + 1  # later rows of this window are ignored
    return judged, score, dist, changed, covered


def device_step(devices: np.ndarray, ends: np.ndarray, pos: np.ndarray, known: np.ndarray, means: np.ndarray,
                stds: np.ndarray, counts: np.ndarray, window_s: float, state: dict[str, np.ndarray], cfg
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Advance the devices of these rows; per row (judged window end or 0, score, D / q, regime change,
    metric judged by the device model)."""
    noise_of_mean = np.where(counts > 0, stds * stds / np.maximum(counts, 1.0), 0.0)  # variance of a window mean
    warmup = min(cfg.device_warmup_windows, state["warm"].shape[1])
    return device_kernel(
        devices, ends, pos, means, noise_of_mean, known, state["scalars"], state["use"], state["mean"],
        state["ref"], state["cov"], state["prec"], state["pend"], state["pend_have"], state["pend_noise"],
        state["last"], state["warm"], state["noise"], warmup, cfg.device_slow_ratio, cfg.device_shrink, cfg.device_alarm_score,
        cfg.device_clear_windows, cfg.device_reopen_distance, cfg.device_reopen_s * 1000.0,
        1.0 - math.exp(-window_s / cfg.device_reopen_tau_s), 1.0 - math.exp(-window_s / cfg.device_adapt_s))
