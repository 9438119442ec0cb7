"""The features' floor in arrays: what `sendtime features` must at least compute, in one pass
of pyarrow + numpy on 2 threads, over a log sorted by (user, ts) (checked: raises otherwise).

    .venv/bin/python benchmarks/features_floor_arrays.py EVENTS.parquet USERS.parquet

(a) per user, event and local hour: counts (the hand-written DuckDB aggregate's result), in a
    dense users x 6 events x 24 hours array; the local hour from each time zone's UTC offset by
    quarter hour (zoneinfo, once), no time-zone call per row and no string hashing per row (each
    row group's user dictionary is mapped to the users' index once).
(b) per user and send local hour: the sends an open with the same message_id answered within
    24 h (the contract's attribution): each open is matched against its own user's sends in
    [open - 24 h, open] by binary search on the sorted (user, ts) key and the ids compared.

Prints "seconds (groups of a, events of a, sends, opened sends, (user, hour) cells with an
opened send)". On the 1M x 100-day benchmark log it gives the DuckDB aggregate's group
and event counts and the SQL floor's sends and opened sends exactly, and cell by cell the same
(a) and (b) as DuckDB with ICU time zones and a SQL join on 61 row groups (helper 20's check,
kept outside the repository). ``bench_refresh.py`` runs it beside the aggregate. Limits: a
sorted single file (a log directory of several files would need the carry across files); every
event's user must be in the users table (the aggregate's join drops unknown users silently).
"""
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

events_path, users_path = sys.argv[1:3]
A_ONLY = bool(int(os.environ.get("A_ONLY", "0")))  # (a) alone: the message ids not read
start = time.perf_counter()

EVENTS = ["send", "open", "click", "purchase", "session", "unsubscribe"]
SEND, OPEN = 0, 1
DAY = 86_400_000_000
Q = 900_000_000  # a quarter hour in us: every modern UTC offset and transition is a multiple

users = pq.read_table(users_path, columns=["user_id", "timezone"])
uindex = pd.Index(users.column("user_id").to_numpy(zero_copy_only=False))
assert uindex.is_unique
tzd = users.column("timezone").combine_chunks().dictionary_encode()
tz_of_user = tzd.indices.to_numpy().astype(np.int64)
tz_names = tzd.dictionary.to_pylist()
nusers = len(uindex)

pf = pq.ParquetFile(events_path)
md = pf.metadata
ts_col = pf.schema_arrow.get_field_index("ts")
tmin = min(md.row_group(i).column(ts_col).statistics.min for i in range(md.num_row_groups))
tmax = max(md.row_group(i).column(ts_col).statistics.max for i in range(md.num_row_groups))
t0 = datetime(tmin.year, tmin.month, tmin.day, tzinfo=timezone.utc)  # 00:00 UTC: q // 4 % 24 is the UTC hour
t0_us = int(t0.timestamp()) * 1_000_000
nq = int((tmax - t0) / timedelta(microseconds=Q)) + 2
# offq[tz * nq + q]: the zone's UTC offset in quarter hours during quarter hour q
offq = np.empty(len(tz_names) * nq, dtype=np.int64)
for z, name in enumerate(tz_names):
    zi = ZoneInfo(name)
    offs = np.array([int((t0 + timedelta(minutes=15 * q)).astimezone(zi).utcoffset().total_seconds()) // 900
                     for q in range(nq)])
    offq[z * nq:(z + 1) * nq] = offs

counts = np.zeros(nusers * 144, dtype=np.int32)
opened = np.zeros(nusers * 24, dtype=np.int32)
lock = threading.Lock()


def add(target, keys, width, weights=None):
    """target[k] += 1 for k in keys (keys span a narrow range of users: the log is sorted by user)."""
    if len(keys) == 0:
        return
    lo, hi = int(keys.min()), int(keys.max())
    lo -= lo % width
    c = np.bincount(keys - lo, minlength=hi - lo + 1)
    with lock:
        target[lo:lo + len(c)] += c.astype(np.int32)


class Worker:
    def __init__(self):
        self.pf = pq.ParquetFile(events_path, read_dictionary=["user_id", "event"])
        self.carry = None  # sends of the last user seen: (comp, hour, uidx, flag, mid)
        self.last_key = -1

    def read(self, rg):
        t = self.pf.read_row_group(rg, columns=["user_id", "ts", "event"] + ([] if A_ONLY else ["message_id"]), use_threads=False)
        uid = t.column("user_id").combine_chunks()
        uidx = uindex.get_indexer(uid.dictionary.to_numpy(zero_copy_only=False))
        assert (uidx >= 0).all(), "events of unknown users"
        uidx = uidx[uid.indices.to_numpy()]
        ev = t.column("event").combine_chunks()
        evmap = np.array([EVENTS.index(x) for x in ev.dictionary.to_pylist()], dtype=np.int64)
        ev = evmap[ev.indices.to_numpy()]
        rel = t.column("ts").combine_chunks().cast(pa.int64()).to_numpy() - t0_us
        return uidx, ev, rel, None if A_ONLY else t.column("message_id").combine_chunks()

    def process(self, uidx, ev, rel, mid, final=False):
        comp = (uidx << 43) | rel
        if len(comp):
            assert comp[0] >= self.last_key and (comp[1:] >= comp[:-1]).all(), "log not sorted by (user, ts)"
            self.last_key = comp[-1]
        q = rel // Q
        hour = ((q + offq[tz_of_user[uidx] * nq + q]) >> 2) % 24
        add(counts, (uidx * 6 + ev) * 24 + hour, 144)
        if A_ONLY:
            return
        # sends of this row group (with the carried sends of the previous row group's last user) and opens
        s = np.flatnonzero(ev == SEND)
        o = np.flatnonzero((ev == OPEN) & mid.is_valid().to_numpy(zero_copy_only=False))
        s_comp, s_hour, s_uidx = comp[s], hour[s], uidx[s]
        s_mid = mid.take(pa.array(s))
        s_flag = np.zeros(len(s), dtype=bool)
        if self.carry is not None:
            c_comp, c_hour, c_uidx, c_flag, c_mid = self.carry
            s_comp = np.concatenate([c_comp, s_comp])
            s_hour = np.concatenate([c_hour, s_hour])
            s_uidx = np.concatenate([c_uidx, s_uidx])
            s_flag = np.concatenate([c_flag, s_flag])
            s_mid = pa.concat_arrays([c_mid, s_mid])
        o_comp, o_rel = comp[o], rel[o]
        o_mid = mid.take(pa.array(o))
        lo = np.searchsorted(s_comp, o_comp - np.minimum(o_rel, DAY), "left")
        hi = np.searchsorted(s_comp, o_comp, "right")
        k = 0
        while True:
            sel = np.flatnonzero(lo + k < hi)
            if len(sel) == 0:
                break
            cand = lo[sel] + k
            eq = pc.equal(s_mid.take(pa.array(cand)), o_mid.take(pa.array(sel))).to_numpy(zero_copy_only=False)
            s_flag[cand[eq]] = True
            k += 1
        # sends of users finished in this row group are final; the last user's carry on
        if final or len(uidx) == 0:
            cut = len(s_comp)
        else:
            cut = int(np.searchsorted(s_uidx, uidx[-1], "left"))
        done = np.flatnonzero(s_flag[:cut])
        add(opened, s_uidx[done] * 24 + s_hour[done], 24)
        self.carry = (s_comp[cut:], s_hour[cut:], s_uidx[cut:], s_flag[cut:], s_mid.slice(cut))

    def run(self, rgs, tail_rg=None, skip_first_user=False):
        for i, rg in enumerate(rgs):
            uidx, ev, rel, mid = self.read(rg)
            if i == 0 and skip_first_user:
                # the previous worker finishes this user (it may have started before this row group)
                n = int(np.searchsorted(uidx, uidx[0], "right"))
                uidx, ev, rel, mid = uidx[n:], ev[n:], rel[n:], mid and mid.slice(n)
            self.process(uidx, ev, rel, mid, final=tail_rg is None and i == len(rgs) - 1)
        if tail_rg is not None:
            uidx, ev, rel, mid = self.read(tail_rg)
            n = int(np.searchsorted(uidx, uidx[0], "right"))
            assert n < len(uidx), "a user spans a whole row group"
            self.process(uidx[:n], ev[:n], rel[:n], mid and mid.slice(0, n), final=True)


nrg = md.num_row_groups
mid_rg = nrg // 2
with ThreadPoolExecutor(2) as ex:
    f1 = ex.submit(Worker().run, list(range(0, mid_rg)), mid_rg)
    f2 = ex.submit(Worker().run, list(range(mid_rg, nrg)), None, True)
    f1.result()
    f2.result()

c = counts.reshape(nusers, 6, 24)
sends_b = c[:, SEND, :]
res = (int(np.count_nonzero(counts)), int(counts.sum(dtype=np.int64)), int(sends_b.sum(dtype=np.int64)),
       int(opened.sum(dtype=np.int64)), int(np.count_nonzero(opened)))
assert (opened.reshape(nusers, 24) <= sends_b).all()
print(time.perf_counter() - start, res)

