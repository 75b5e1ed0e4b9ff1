"""Per-series memory and the three per-series detectors, as one numba kernel over arrays of series.

Every series (tenant, device, metric, window size) owns one row of a float64 state matrix
(columns named below) plus rings for its last K window means (Triton's features) and its
seasonal profile. ``series_step`` advances the rows of one batch in arrival order:

- **Forecaster**: a robust Holt model (level + trend, residuals clipped at ``HUBER`` scales so a
  spike does not drag it) on the seasonally adjusted mean. The season is a time-of-day profile
  (``TOD_BINS`` bins) and a day-of-week profile, each learned online against a slow baseline
  (memory ``long_windows``) and used once the series' history spans two days / two weeks.
- **Residual scale**: an exponentially weighted mean of squared one-step residuals times the
  window's reading count, so a window of few readings is judged by its own, wider, spread; it
  learns over ``long_windows`` (hours to days), with equal weights while young. Windows judged
  anomalous do not teach it.
- **Detectors**, each a statistic turned into a calibrated 0..1 score by ``calibrate`` (0.5 at
  the statistic's normal-operation tail ``q``): ``level`` = |z| of the one-step residual,
  ``spread`` = |z| of log(window std) against its own baseline (a stuck or suddenly noisy
  sensor; windows of fewer than 3 readings are not judged; an exact repeat of the previous window's
  last reading, in a series whose readings never repeated, counts as stuck), ``change`` = a two-sided CUSUM on z
  (a sustained shift or drift too small for one window to show).
- **New regime**: after ``regime_windows`` anomalous windows in a row the series is re-learned
  from its current behaviour (a drift event), so a permanent change raises an alarm and then
  becomes the new normal instead of alarming forever.

While a series is young (its first ``warmup_windows`` windows) its residuals are judged against
the wider of its readings' own within-window noise (``YOUNG_INFLATE`` times wider) and its
residuals so far, from its fourth window on, so
a new device is watched from its first minute; its spread is judged from its third window too.
A row whose window end is not after the series' last one (a replay after a restart) is skipped.

Known weakness: the forecaster adapts within tens of windows, so a slow level change is judged
by the CUSUM and the device model rather than by ``level``; the seasonal profile needs days of
history before it helps.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# --- state columns ------------------------------------------------------------------------
N, FIRST_END, LAST_END, LEVEL, TREND, RES_VAR, BASE, SP_N, SP_MEAN, SP_VAR, CUSUM_HI, CUSUM_LO, RUN, WITHIN, \
    ZERO_SD, PREV_LAST, REPEATS = range(17)
N_STATE = 17
TOD_BINS = 24
DOW_BINS = 7
DAY_MS = 86_400_000

# --- outputs per row ------------------------------------------------------------------------
OUT_FORECAST, OUT_SCALE, OUT_Z, OUT_LEVEL, OUT_SPREAD, OUT_CHANGE, OUT_ANOMALY, OUT_NEXT, OUT_REGIME = range(9)
N_OUT = 9

YOUNG_INFLATE = 1.5  # a young series' residual scale: its within-window noise, this much wider
HUBER = 3.0          # residuals beyond this many scales count as this many (robust updates)
OUTLIER_Z = 4.0      # a window this far out does not teach the residual scale
SP_FLOOR = 0.05      # log-std scale floor: std ratios within ~5 % are always normal
SEASON_MEMORY_MS = 3 * DAY_MS  # a time-of-day / day-of-week bin remembers about this many days
CUSUM_K = 1.0        # CUSUM allowance (detects shifts of about 2 scales)
Z_CLIP = 50.0


@njit(cache=True, nogil=True, error_model="numpy")
def calibrate(stat: float, q: float) -> float:
    """A non-negative statistic -> 0..1: 0 at 0, 0.5 at ``q``, 0.75 at 2q, 0.875 at 3q."""
    if not stat > 0.0:
        return 0.0
    return 1.0 - 0.5 ** (stat / q)


@njit(cache=True, nogil=True, error_model="numpy")
def _season(tod: np.ndarray, dow: np.ndarray, s: int, end_ms: int, span_ms: float) -> float:
    """The seasonal offset of window end ``end_ms`` once the history spans its period."""
    off = 0.0
    if span_ms >= 2 * DAY_MS:
        off += tod[s, (end_ms % DAY_MS) * TOD_BINS // DAY_MS]
    if span_ms >= 14 * DAY_MS:
        off += dow[s, (end_ms // DAY_MS + 3) % DOW_BINS]  # epoch day 0 was a Thursday: Monday = 0
    return off


@njit(cache=True, nogil=True, error_model="numpy")
def _reset(st: np.ndarray, tod: np.ndarray, dow: np.ndarray, s: int, end: int, x: float) -> None:
    """Forget a series' behaviour and start learning it again at window ``end`` of mean ``x``."""
    st[:] = 0.0
    st[FIRST_END], st[LAST_END], st[LEVEL], st[BASE] = end, end, x, x
    tod[s, :] = 0.0
    dow[s, :] = 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def series_step(slots: np.ndarray, ends: np.ndarray, next_ends: np.ndarray, means: np.ndarray, stds: np.ndarray,
                counts: np.ndarray, firsts: np.ndarray, lasts: np.ndarray, state: np.ndarray, history: np.ndarray, tod: np.ndarray, dow: np.ndarray,
                alpha: float, beta: float, long_windows: float, warmup_windows: int, regime_windows: int,
                q_level: float, q_spread: float, q_change: float) -> np.ndarray:
    """Advance the series of ``slots`` by one window each row (rows in arrival order); returns
    [n, N_OUT] outputs, OUT_NEXT = NaN for rows skipped as already seen."""
    n = slots.size
    out = np.full((n, N_OUT), np.nan)
    k = history.shape[1]
    for i in range(n):
        s, end, x = slots[i], ends[i], means[i]
        st = state[s]
        if st[LAST_END] != 0 and end <= st[LAST_END]:
            continue
        c = max(counts[i], 1.0)
        if st[LAST_END] == 0:  # a new series
            _reset(st, tod, dow, s, end, x)
            for j in range(k):
                history[s, j] = x
        span = float(end - st[FIRST_END])
        season = _season(tod, dow, s, end, span)
        # one-step forecast for this window (made from the state before it), a gap extrapolated
        steps = 1.0
        if st[N] > 1:
            typical = (st[LAST_END] - st[FIRST_END]) / (st[N] - 1.0)
            steps = min(max((end - st[LAST_END]) / max(typical, 1.0), 1.0), 10.0)
        forecast = st[LEVEL] + steps * st[TREND] + season
        residual = x - forecast
        young = st[N] < warmup_windows
        scale = math.sqrt(max(st[RES_VAR], st[WITHIN]) / c)  # never below its readings' own noise
        z = 0.0
        if not young and scale > 0:
            z = min(max(residual / scale, -Z_CLIP), Z_CLIP)
        elif young and st[N] >= 3 and st[WITHIN] > 0:
            # meanwhile: against the wider of its readings' own noise and the residuals seen so far
            young_scale = math.sqrt(max(YOUNG_INFLATE * YOUNG_INFLATE * st[WITHIN], st[RES_VAR]) / c)
            z = min(max(residual / young_scale, -Z_CLIP), Z_CLIP)
        # spread: log std of the window against its own baseline
        # (a series that had a window of std 0 before, e.g. quantized readings, is not judged on those)
        has_spread = counts[i] >= 3 and math.isfinite(stds[i]) and not (stds[i] == 0.0 and st[ZERO_SD] > 0)
        ls = math.log(max(stds[i], 1e-12 + 1e-9 * abs(x))) if has_spread else 0.0
        z_sp = 0.0
        if has_spread and st[SP_N] > 1:
            z_sp = min(max((ls - st[SP_MEAN]) / max(math.sqrt(st[SP_VAR]), SP_FLOOR), -Z_CLIP), Z_CLIP)
        zc = min(max(z, -HUBER), HUBER)  # an outlier is the level score's; the CUSUM adds up small shifts
        hi = max(0.0, st[CUSUM_HI] + zc - CUSUM_K)
        lo = max(0.0, st[CUSUM_LO] - zc - CUSUM_K)
        # a reading repeated exactly across the boundary of consecutive windows: a stuck sign for a
        # series whose readings never repeated before (judged once, like std 0)
        repeat = st[N] > 0 and steps == 1.0 and firsts[i] == st[PREV_LAST]
        if repeat and st[REPEATS] == 0.0 and st[N] >= 3:
            z_sp = Z_CLIP
        level_score = calibrate(abs(z), q_level)
        spread_score = calibrate(abs(z_sp), q_spread)
        change_score = calibrate(max(hi, lo), q_change)
        outlier = abs(z) > OUTLIER_Z or abs(z_sp) > OUTLIER_Z
        out[i, OUT_FORECAST], out[i, OUT_SCALE], out[i, OUT_Z] = forecast, scale, z
        out[i, OUT_LEVEL], out[i, OUT_SPREAD], out[i, OUT_CHANGE] = level_score, spread_score, change_score
        out[i, OUT_ANOMALY] = max(level_score, spread_score, change_score)
        out[i, OUT_REGIME] = 0.0
        # --- learn --------------------------------------------------------------------------
        st[RUN] = st[RUN] + 1.0 if outlier and not young else 0.0
        if st[RUN] >= regime_windows:  # a new normal: re-learn from here
            out[i, OUT_REGIME] = 1.0
            _reset(st, tod, dow, s, end, x)
        else:
            st[CUSUM_HI], st[CUSUM_LO] = (0.0, 0.0) if abs(z) > OUTLIER_Z else (hi, lo)
            w = 1.0 / max(st[N], 1.0) if st[N] < long_windows else 1.0 / long_windows
            if st[N] > 0:  # every window teaches, an outlier only as much as HUBER scales (robust, not blind)
                r2c = residual * residual * c
                if st[RES_VAR] > 0:
                    r2c = min(r2c, HUBER * HUBER * st[RES_VAR])
                st[RES_VAR] += w * (r2c - st[RES_VAR])
            if has_spread and stds[i] == 0.0:
                st[ZERO_SD] += 1.0  # judged once; from now on std 0 may be this series' resolution
            elif has_spread and (young or not outlier):
                st[SP_N] += 1.0
                st[WITHIN] += (stds[i] * stds[i] - st[WITHIN]) / st[SP_N]
                d = ls - st[SP_MEAN]
                w_sp = 1.0 / st[SP_N] if st[SP_N] < long_windows else 1.0 / long_windows
                st[SP_MEAN] += w_sp * d
                st[SP_VAR] += w_sp * ((1.0 - w_sp) * d * d - st[SP_VAR])
            # robust Holt on the seasonally adjusted mean (a running mean while young)
            lim = HUBER * math.sqrt(st[RES_VAR] / c) if st[RES_VAR] > 0 else abs(residual)
            r = min(max(residual, -lim), lim)
            a = max(alpha, 1.0 / (st[N] + 1.0)) if young else alpha
            level_before = st[LEVEL]
            st[LEVEL] = st[LEVEL] + steps * st[TREND] + a * r
            st[TREND] += beta * ((st[LEVEL] - level_before) / steps - st[TREND])
            # the slow baseline, and the seasonal profiles it teaches
            st[BASE] += max(w, 1.0 / long_windows) * (x - season - st[BASE])
            if st[N] > 1:
                # a bin's weight: 1 / its visits so far, down to about SEASON_MEMORY_MS of visits (not
                # gated on outliers: an hour that is always different is an outlier until learned)
                spacing = max((end - st[FIRST_END]) / st[N], 1.0)
                per_day = DAY_MS / TOD_BINS / spacing
                tb = (end % DAY_MS) * TOD_BINS // DAY_MS
                rate = 1.0 / max(per_day * min(span, SEASON_MEMORY_MS) / DAY_MS, 1.0)
                tod[s, tb] += rate * (x - st[BASE] - tod[s, tb])
                db = (end // DAY_MS + 3) % DOW_BINS
                rate = 1.0 / max(per_day * TOD_BINS * min(span, 7 * SEASON_MEMORY_MS) / (7 * DAY_MS), 1.0)
                dow[s, db] += rate * (x - st[BASE] - tod[s, tb] - dow[s, db])
            st[N] += 1.0
        st[LAST_END] = end
        st[PREV_LAST] = lasts[i]
        if repeat:
            st[REPEATS] += 1.0
        for j in range(k - 1):
            history[s, j] = history[s, j + 1]
        history[s, k - 1] = x
        out[i, OUT_NEXT] = st[LEVEL] + st[TREND] + _season(tod, dow, s, next_ends[i], float(next_ends[i] - st[FIRST_END]))
    return out
