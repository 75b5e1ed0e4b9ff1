"""Plain numpy reference of the device model (one device, windows in time order); the numba kernel
in aimass.models.device_model is tested against it (tests/test_detectors.py)."""
import numpy as np

CHI2_99 = np.array([6.635, 9.210, 11.345, 13.277, 15.086, 16.812, 18.475, 20.090, 21.666, 23.209,
                    24.725, 26.217, 27.688, 29.141, 30.578, 32.000])      # chi2.ppf(0.99, p), p = 1..16

P_ = dict(vr_cut=20.0, shrink=0.3, thr=2.0, k_on=1, k_off=3,
          tau_adapt=1800.0, rearm=True, thr_re=1.0, tau_ref=120.0, cool=20.0, W=10.0)


def device_scores(t0, n, mean, std, warm_n, P=P_):
    """t0 (K,) window start [s]; n (K,) row counts; mean, std (K,p) per-metric window mean / population std;
    warm_n = number of warm-up windows (those closed within the first 400 s / 400 rows).
    Returns score (K,) in [0,1) (0 during warm-up), alarm (K,) 0/1, rearm (K,) bool."""
    K, p = mean.shape
    # ---- warm-up, equal weights: which metrics are slow (drift) -> excluded from the level model
    Mw = mean[:warm_n]
    vr = Mw.var(0) / (np.mean(std[:warm_n] ** 2 / n[:warm_n, None], 0) + 1e-12)   # between/within variance
    slow = vr > P['vr_cut']        # slow (drifting) metrics enter as their change from the previous window

    def feat(k):
        return np.r_[mean[k, ~slow], (mean[k] - mean[k - 1])[slow]]

    F = np.array([feat(k) for k in range(1, warm_n)]); nn, q_ = F.shape
    m = F.mean(0); R = F - m
    C = R.T @ R / (nn - 1); C = (1 - P['shrink']) * C + P['shrink'] * np.diag(np.diag(C))
    # ---- normaliser q: chi2_p 0.99 quantile x (mean leave-one-out distance / p)  ('loo' in stream_eval)
    Dl = np.empty(nn)
    for i in range(nn):
        Fi = np.delete(F, i, 0); mi = Fi.mean(0); Ri = Fi - mi
        Ci = Ri.T @ Ri / (nn - 2); Ci = (1 - P['shrink']) * Ci + P['shrink'] * np.diag(np.diag(Ci))
        r = F[i] - mi; Dl[i] = r @ np.linalg.solve(Ci, r)
    q = CHI2_99[q_ - 1] * Dl.mean() / q_
    Pm = np.linalg.inv(C)
    a_ad = 1 - np.exp(-P['W'] / P['tau_adapt']); a_ref = 1 - np.exp(-P['W'] / P['tau_ref'])
    score = np.zeros(K); alarm = np.zeros(K, np.int8); rearm = np.zeros(K, bool)
    st = on = off = 0; ref = np.zeros(q_); t_last = 0.0
    for k in range(warm_n, K):
        f = feat(k); r = f - m
        D = r @ Pm @ r
        score[k] = 1 - 0.5 ** (D / q)              # 0.5 at D = q; alarm level thr=2 <=> score > 0.75
        hot = D > P['thr'] * q
        was = st
        if st == 0:
            on = on + 1 if hot else 0
            if on >= P['k_on']:
                st, off = 1, 0
        else:
            off = off + 1 if not hot else 0
            if off >= P['k_off']:
                st, on = 0, 0
        alarm[k] = st
        if st and not was:                          # incident opens: reference = current residual
            ref = r.copy(); t_last = t0[k]
        elif st and P['rearm']:
            dr = r - ref
            if dr @ Pm @ dr / q > P['thr_re'] and t0[k] - t_last >= P['cool']:
                rearm[k] = True; ref = r.copy(); t_last = t0[k]   # incident changed regime: re-open
            else:
                ref += a_ref * (r - ref)
        if st == 0 and D <= q:                      # slow adaptation on quiet windows only
            m = m + a_ad * r
            rr = f - m
            C = (1 - a_ad) * C + a_ad * np.outer(rr, rr)
            Pm = np.linalg.inv(C)
    return score, alarm, rearm
