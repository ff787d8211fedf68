"""Dispatch kernels: top-k ids -> per-expert counts, int64 padded offsets and the slots sorted by expert.
Twin: `moegen.reference.dispatch_ref` (same buffers, same sentinels, same order); the tiled GPU variant's
scratch: `moegen.reference.tile_counts_ref`.

Shape legend: T tokens (symbolic), K top-k, S = T*K slots, E global experts, El local experts,
BM rows per block, MB = ceil(S / BM) + El blocks at most, MP = MB * BM sorted rows; tiled variant:
TS slots per tile, NT = ceil(S / TS) tiles.

Three forms of one contract: dispatch_func (serial: the CPU), dispatch_threads_func (one GPU thread
block) and dispatch_tiles_funcs (count, scan and place kernels over tiles of slots: many thread blocks).

Each expert's rows start on a block boundary (the block-aligned sort of vLLM's moe_align_block_size),
so the expert GEMMs see whole blocks of one expert. A slot whose expert is -1 in `expert_map` (owned
by another EP rank) is left out: slot_pos -1. Padding rows hold the sentinel S.
"""

from __future__ import annotations

from tvm.script import tirx as T

from . import token_var


def dispatch_func(num_experts: int, local_experts: int, top_k: int, block_m: int):
    """PrimFunc `dispatch(topk_ids [T, K] i32, expert_map [E] i32, counts [El] i32, offsets [El+1] i64,
    sorted_ids [MP] i32, block_expert [MB] i32, num_blocks [1] i32, slot_pos [T*K] i32)`."""
    d_E, d_El, d_K, d_BM = num_experts, local_experts, top_k, block_m
    tok = token_var()
    n_slots = tok * d_K
    n_blocks = (n_slots + (d_BM - 1)) // d_BM + d_El

    @T.prim_func(s_tir=True)
    def dispatch(ids_h: T.handle, map_h: T.handle, counts_h: T.handle, offsets_h: T.handle,
                 sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        topk_ids = T.match_buffer(ids_h, (tok, d_K), "int32")
        expert_map = T.match_buffer(map_h, (d_E,), "int32")
        counts = T.match_buffer(counts_h, (d_El,), "int32")
        offsets = T.match_buffer(offsets_h, (d_El + 1,), "int64")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * d_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        slot_pos = T.match_buffer(pos_h, (n_slots,), "int32")
        for _one in range(1):  # a loop for schedules to bind (a GPU runs this on one thread)
            with T.sblock("dispatch"):
                T.reads(topk_ids[0:tok, 0:d_K], expert_map[0:d_E])
                T.writes(counts[0:d_El], offsets[0:d_El + 1], sorted_ids[0:n_blocks * d_BM],
                         block_expert[0:n_blocks], num_blocks[0], slot_pos[0:n_slots])
                for e in range(d_El):
                    counts[e] = 0
                for s in range(n_slots):
                    if expert_map[topk_ids[s // d_K, s % d_K]] >= 0:
                        counts[expert_map[topk_ids[s // d_K, s % d_K]]] += 1
                offsets[0] = T.int64(0)
                for e in range(d_El):
                    offsets[e + 1] = offsets[e] + T.Cast("int64", (counts[e] + (d_BM - 1)) // d_BM * d_BM)
                for r in range(n_blocks * d_BM):
                    sorted_ids[r] = T.Cast("int32", n_slots)
                for b in range(n_blocks):
                    block_expert[b] = -1
                for e in range(d_El):
                    for b in range(offsets[e] // d_BM, offsets[e + 1] // d_BM):
                        block_expert[b] = e
                num_blocks[0] = T.Cast("int32", offsets[d_El] // d_BM)
                # second pass: counts double as per-expert cursors and end equal to the first pass
                for e in range(d_El):
                    counts[e] = 0
                for s in range(n_slots):
                    if expert_map[topk_ids[s // d_K, s % d_K]] >= 0:
                        slot_pos[s] = T.Cast("int32", offsets[expert_map[topk_ids[s // d_K, s % d_K]]]
                                             + T.Cast("int64", counts[expert_map[topk_ids[s // d_K, s % d_K]]]))
                        sorted_ids[slot_pos[s]] = T.Cast("int32", s)
                        counts[expert_map[topk_ids[s // d_K, s % d_K]]] += 1
                    else:
                        slot_pos[s] = -1

    return dispatch


STAGED_SLOTS_PER_THREAD = 16  # dispatch_threads_func: slots each thread stages per chunk (chunk = 16 x threads)
SCAN_UNROLL = 8  # dispatch_threads_func: staged slots each thread reads before comparing them (loads in flight)


def dispatch_threads_func(num_experts: int, local_experts: int, top_k: int, block_m: int, threads: int):
    """The same contract as dispatch_func, computed by one GPU thread block: thread e owns local
    experts e, e + threads, ...; each scans the slots in order, so the sort stays stable and needs no
    atomics (O(El * T * K) work spread over El threads). The slots' local experts are staged in shared
    memory a chunk at a time by all threads (coalesced), so each thread's scan reads shared memory
    (broadcasts) instead of a dependent pair of global loads per slot: on the H100 those made the
    dispatch 2.2 ms of Qwen3-30B-A3B's 4.0 ms at 4096 tokens.
    An algorithm for thread-parallel hardware, so it names its threads; CPUs use dispatch_func."""
    d_E, d_El, d_K, d_BM, d_TH = num_experts, local_experts, top_k, block_m, threads
    d_rounds = (d_El + d_TH - 1) // d_TH  # experts per thread
    d_CH = STAGED_SLOTS_PER_THREAD * d_TH  # slots per staged chunk
    d_U = SCAN_UNROLL  # (divides d_CH: the chunk is padded with -2, so a scan may overrun the last slot)
    d_SPT = STAGED_SLOTS_PER_THREAD
    tok = token_var()
    n_slots = tok * d_K
    n_blocks = (n_slots + (d_BM - 1)) // d_BM + d_El

    @T.prim_func
    def dispatch(ids_h: T.handle, map_h: T.handle, counts_h: T.handle, offsets_h: T.handle,
                 sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        topk_ids = T.match_buffer(ids_h, (tok, d_K), "int32")
        expert_map = T.match_buffer(map_h, (d_E,), "int32")
        counts = T.match_buffer(counts_h, (d_El,), "int32")
        offsets = T.match_buffer(offsets_h, (d_El + 1,), "int64")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * d_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        slot_pos = T.match_buffer(pos_h, (n_slots,), "int32")
        bx = T.launch_thread("blockIdx.x", 1)
        tx = T.launch_thread("threadIdx.x", d_TH)
        cur = T.alloc_buffer((1,), "int64", scope="local")
        loc = T.alloc_buffer((d_CH,), "int32", scope="shared")  # local experts of one chunk of slots
        mine = T.alloc_buffer((d_U,), "int32", scope="local")  # d_U staged slots, read into registers first
        ids = T.alloc_buffer((d_SPT,), "int32", scope="local")  # this thread's share of a chunk, staging
        cnt = T.alloc_buffer((d_El,), "int64", scope="shared")  # counts
        off = T.alloc_buffer((d_El + 1,), "int64", scope="shared")  # padded offsets
        run = T.alloc_buffer((1,), "int64", scope="local")  # the prefix sum's running total
        # 1. each thread counts its experts' slots
        for r in range(d_rounds):
            cur[0] = T.int64(0)
            for c in range((n_slots + (d_CH - 1)) // d_CH):
                _stage_chunk(c, d_CH, d_TH, d_K, tx, n_slots, loc, ids, topk_ids, expert_map, slot_pos, False)
                if r * d_TH + tx < d_El:
                    _scan_staged(c * d_CH, d_CH, d_U, n_slots, r * d_TH + tx, loc, mine, cur, False, None, None)
                T.tvm_storage_sync("shared")
            if r * d_TH + tx < d_El:
                counts[r * d_TH + tx] = T.Cast("int32", cur[0])
                cnt[r * d_TH + tx] = cur[0]
        T.tvm_storage_sync("shared")
        # 2. padded offsets: a prefix sum over El in shared memory (one thread; El is at most a few
        # hundred), then copied out by all
        if tx == 0:
            run[0] = T.int64(0)
            off[0] = T.int64(0)
            for e in range(d_El):
                run[0] = run[0] + (cnt[e] + (d_BM - 1)) // d_BM * d_BM
                off[e + 1] = run[0]
            num_blocks[0] = T.Cast("int32", run[0] // d_BM)
        T.tvm_storage_sync("shared")
        for r in range((d_El + 1 + (d_TH - 1)) // d_TH):
            if r * d_TH + tx < d_El + 1:
                offsets[r * d_TH + tx] = off[r * d_TH + tx]
        # 3. padding rows and unused blocks, every thread a stride of them
        for r in range((n_blocks * d_BM + (d_TH - 1)) // d_TH):
            if r * d_TH + tx < n_blocks * d_BM:
                sorted_ids[r * d_TH + tx] = T.Cast("int32", n_slots)
        for r in range((n_blocks + (d_TH - 1)) // d_TH):
            if r * d_TH + tx < n_blocks:
                block_expert[r * d_TH + tx] = -1
        T.tvm_storage_sync("shared")
        # 4. each thread places its experts' slots in ascending order and names its blocks (the staging
        # marks the slots of other EP ranks' experts: slot_pos -1)
        for r in range(d_rounds):
            if r * d_TH + tx < d_El:
                cur[0] = off[r * d_TH + tx]
            for c in range((n_slots + (d_CH - 1)) // d_CH):
                _stage_chunk(c, d_CH, d_TH, d_K, tx, n_slots, loc, ids, topk_ids, expert_map, slot_pos, True)
                if r * d_TH + tx < d_El:
                    _scan_staged(c * d_CH, d_CH, d_U, n_slots, r * d_TH + tx, loc, mine, cur, True, sorted_ids,
                                 slot_pos)
                T.tvm_storage_sync("shared")
            if r * d_TH + tx < d_El:
                cur[0] = off[r * d_TH + tx]  # (shared memory into registers: loop bounds cannot read it)
                run[0] = off[r * d_TH + tx + 1]
                for b in range(cur[0] // d_BM, run[0] // d_BM):
                    block_expert[b] = r * d_TH + tx

    return dispatch


@T.macro
def _stage_chunk(c, CH, TH, K, tx, n_slots, loc, ids, topk_ids, expert_map, slot_pos, mark_foreign):
    """loc[i] = the local expert of slot c*CH + i (-2 past the last slot: no thread's expert, and not
    the -1 of another rank's), all threads of the block, then a barrier. Each thread loads its share of
    topk ids first, then their experts, so its loads are in flight together. mark_foreign: slot_pos -1
    for the slots of other EP ranks' experts."""
    for j in T.unroll(CH // TH):
        if c * CH + j * TH + tx < n_slots:
            ids[j] = topk_ids[(c * CH + j * TH + tx) // K, (c * CH + j * TH + tx) % K]
        else:
            ids[j] = -1
    for j in T.unroll(CH // TH):
        if ids[j] >= 0:
            ids[j] = expert_map[ids[j]]
            if mark_foreign:
                if ids[j] < 0:
                    slot_pos[c * CH + j * TH + tx] = -1
        else:
            ids[j] = -2
        loc[j * TH + tx] = ids[j]
    T.tvm_storage_sync("shared")


@T.macro
def _scan_staged(start, size, U, n_slots, e, loc, mine, cur, place, sorted_ids, slot_pos):
    """The thread of local expert e reads the staged slots start .. start + min(size, n_slots - start) - 1
    (loc, from _stage_chunk) in order, U at a time into registers first. place false: cur[0] counts the
    slots of e. place true: each slot of e goes to row cur[0] (sorted_ids, slot_pos), which advances,
    so the order stays stable."""
    for i in range((T.min(T.int64(size), n_slots - start) + (U - 1)) // U):
        for u in T.unroll(U):
            mine[u] = loc[i * U + u]
        for u in T.unroll(U):
            if place:
                if mine[u] == e:
                    sorted_ids[cur[0]] = T.Cast("int32", start + i * U + u)
                    slot_pos[start + i * U + u] = T.Cast("int32", cur[0])
                    cur[0] = cur[0] + T.int64(1)
            else:
                cur[0] = cur[0] + T.Cast(cur.dtype, mine[u] == e)


def dispatch_tiles_funcs(num_experts: int, local_experts: int, top_k: int, block_m: int, threads: int,
                         tile: int):
    """The same contract as dispatch_func, for GPUs, in three kernels over tiles of `tile` slots, so the
    work is O(El * T * K / threads) per thread block and spread over NT = ceil(S / tile) thread blocks
    (the one-block dispatch_threads_func scans all S slots on one SM: 984 us of Qwen3-30B-A3B's 2.8 ms at
    4096 tokens on the H100). Shared scratch: tile_counts [NT * El] i32, written by the first two.

      count (NT blocks): tile_counts[t, e] = slots of tile t whose local expert is e;
      scan (one block):  tile_counts[t, e] becomes the count of e in the tiles before t (an exclusive
                         prefix over t), counts and padded offsets (a prefix over El), num_blocks,
                         block_expert, and the sentinel on every row no slot fills;
      place (NT blocks): slot s of tile t goes to row offsets[e] + tile_counts[t, e] + (slots of e
                         before s in tile t), so the order stays stable (dispatch_ref's) with no atomics.
    In count and place, thread e of a block owns local experts e, e + threads, ... and scans its tile's
    staged slots in order (as dispatch_threads_func does over all of them). Returns (count, scan, place)."""
    d_E, d_El, d_K, d_BM, d_TH, d_TS = num_experts, local_experts, top_k, block_m, threads, tile
    assert d_TH & (d_TH - 1) == 0 and d_TS % d_TH == 0 and d_TS % SCAN_UNROLL == 0, (threads, tile)
    d_rounds = (d_El + d_TH - 1) // d_TH  # experts per thread: strided in count and place, consecutive in scan
    d_U, d_SPT = SCAN_UNROLL, d_TS // d_TH
    d_steps = d_TH.bit_length() - 1  # log2(threads): the prefix sum's doubling steps
    tok = token_var()
    n_slots = tok * d_K
    n_tiles = (n_slots + (d_TS - 1)) // d_TS
    n_blocks = (n_slots + (d_BM - 1)) // d_BM + d_El

    @T.prim_func
    def dispatch_count(ids_h: T.handle, map_h: T.handle, tiles_h: T.handle):
        T.func_attr({"tir.noalias": True})
        topk_ids = T.match_buffer(ids_h, (tok, d_K), "int32")
        expert_map = T.match_buffer(map_h, (d_E,), "int32")
        tile_counts = T.match_buffer(tiles_h, (n_tiles * d_El,), "int32")
        bx = T.launch_thread("blockIdx.x", n_tiles)
        tx = T.launch_thread("threadIdx.x", d_TH)
        loc = T.alloc_buffer((d_TS,), "int32", scope="shared")
        ids = T.alloc_buffer((d_SPT,), "int32", scope="local")
        mine = T.alloc_buffer((d_U,), "int32", scope="local")
        cur = T.alloc_buffer((1,), "int32", scope="local")
        _stage_chunk(bx, d_TS, d_TH, d_K, tx, n_slots, loc, ids, topk_ids, expert_map, None, False)
        for r in range(d_rounds):
            if r * d_TH + tx < d_El:
                cur[0] = 0
                _scan_staged(bx * d_TS, d_TS, d_U, n_slots, r * d_TH + tx, loc, mine, cur, False, None, None)
                tile_counts[bx * d_El + r * d_TH + tx] = cur[0]

    @T.prim_func
    def dispatch_scan(ids_h: T.handle, tiles_h: T.handle, counts_h: T.handle, offsets_h: T.handle,
                      sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle):
        T.func_attr({"tir.noalias": True})
        T.match_buffer(ids_h, (tok, d_K), "int32")  # (not read: its shape names T)
        tile_counts = T.match_buffer(tiles_h, (n_tiles * d_El,), "int32")
        counts = T.match_buffer(counts_h, (d_El,), "int32")
        offsets = T.match_buffer(offsets_h, (d_El + 1,), "int64")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * d_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        bx = T.launch_thread("blockIdx.x", 1)
        tx = T.launch_thread("threadIdx.x", d_TH)
        cnt = T.alloc_buffer((d_El,), "int32", scope="shared")  # slots per expert
        off = T.alloc_buffer((d_El + 1,), "int64", scope="shared")  # padded offsets
        part = T.alloc_buffer((d_TH,), "int64", scope="shared")  # the prefix sum over threads
        run = T.alloc_buffer((1,), "int32", scope="local")
        got = T.alloc_buffer((d_U,), "int32", scope="local")  # d_U tiles' counts of one expert
        mine = T.alloc_buffer((1,), "int64", scope="local")
        prev = T.alloc_buffer((1,), "int64", scope="local")
        # 1. per expert, an exclusive prefix of its counts over the tiles (in place), d_U tiles' counts
        # loaded before any is summed (loads in flight together; the tiles past the last read as 0)
        for r in range(d_rounds):
            if r * d_TH + tx < d_El:
                run[0] = 0
                for t in range((n_tiles + (d_U - 1)) // d_U):
                    for u in T.unroll(d_U):
                        got[u] = 0
                        if t * d_U + u < n_tiles:
                            got[u] = tile_counts[(t * d_U + u) * d_El + r * d_TH + tx]
                    for u in T.unroll(d_U):
                        if t * d_U + u < n_tiles:
                            tile_counts[(t * d_U + u) * d_El + r * d_TH + tx] = run[0]
                        run[0] = run[0] + got[u]
                counts[r * d_TH + tx] = run[0]
                cnt[r * d_TH + tx] = run[0]
        T.tvm_storage_sync("shared")
        # 2. padded offsets: thread i sums experts i*R .. i*R+R-1, a doubling prefix sum over the threads
        mine[0] = T.int64(0)
        for j in range(d_rounds):
            if tx * d_rounds + j < d_El:
                mine[0] = mine[0] + T.Cast("int64", (cnt[tx * d_rounds + j] + (d_BM - 1)) // d_BM * d_BM)
        part[tx] = mine[0]
        T.tvm_storage_sync("shared")
        for step in T.unroll(d_steps):
            prev[0] = T.int64(0)
            if tx >= (1 << step):
                prev[0] = part[tx - (1 << step)]
            T.tvm_storage_sync("shared")
            part[tx] = part[tx] + prev[0]
            T.tvm_storage_sync("shared")
        prev[0] = part[tx] - mine[0]  # this thread's experts start here
        if tx == 0:
            off[0] = T.int64(0)
        for j in range(d_rounds):
            if tx * d_rounds + j < d_El:
                prev[0] = prev[0] + T.Cast("int64", (cnt[tx * d_rounds + j] + (d_BM - 1)) // d_BM * d_BM)
                off[tx * d_rounds + j + 1] = prev[0]
        T.tvm_storage_sync("shared")
        if tx == 0:
            num_blocks[0] = T.Cast("int32", off[d_El] // d_BM)
        for r in range((d_El + 1 + (d_TH - 1)) // d_TH):
            if r * d_TH + tx < d_El + 1:
                offsets[r * d_TH + tx] = off[r * d_TH + tx]
        # 3. each expert names its blocks and fills its padding rows; every thread a stride of the rows
        # and blocks past the last expert's
        for r in range(d_rounds):
            if r * d_TH + tx < d_El:
                mine[0] = off[r * d_TH + tx]  # (shared memory into registers: loop bounds cannot read it)
                prev[0] = off[r * d_TH + tx + 1]
                for b in range(mine[0] // d_BM, prev[0] // d_BM):
                    block_expert[b] = r * d_TH + tx
                mine[0] = mine[0] + T.Cast("int64", cnt[r * d_TH + tx])
                for row in range(mine[0], prev[0]):
                    sorted_ids[row] = T.Cast("int32", n_slots)
        mine[0] = off[d_El]
        for r in range((n_blocks * d_BM - mine[0] + (d_TH - 1)) // d_TH):
            if mine[0] + r * d_TH + tx < n_blocks * d_BM:
                sorted_ids[mine[0] + r * d_TH + tx] = T.Cast("int32", n_slots)
        for r in range((n_blocks - mine[0] // d_BM + (d_TH - 1)) // d_TH):
            if mine[0] // d_BM + r * d_TH + tx < n_blocks:
                block_expert[mine[0] // d_BM + r * d_TH + tx] = -1

    @T.prim_func
    def dispatch_place(ids_h: T.handle, map_h: T.handle, tiles_h: T.handle, offsets_h: T.handle,
                       sorted_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        topk_ids = T.match_buffer(ids_h, (tok, d_K), "int32")
        expert_map = T.match_buffer(map_h, (d_E,), "int32")
        tile_counts = T.match_buffer(tiles_h, (n_tiles * d_El,), "int32")
        offsets = T.match_buffer(offsets_h, (d_El + 1,), "int64")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * d_BM,), "int32")
        slot_pos = T.match_buffer(pos_h, (n_slots,), "int32")
        bx = T.launch_thread("blockIdx.x", n_tiles)
        tx = T.launch_thread("threadIdx.x", d_TH)
        loc = T.alloc_buffer((d_TS,), "int32", scope="shared")
        ids = T.alloc_buffer((d_SPT,), "int32", scope="local")
        mine = T.alloc_buffer((d_U,), "int32", scope="local")
        cur = T.alloc_buffer((1,), "int64", scope="local")
        # (the staging marks the slots of other EP ranks' experts: slot_pos -1)
        _stage_chunk(bx, d_TS, d_TH, d_K, tx, n_slots, loc, ids, topk_ids, expert_map, slot_pos, True)
        for r in range(d_rounds):
            if r * d_TH + tx < d_El:
                cur[0] = offsets[r * d_TH + tx] + T.Cast("int64", tile_counts[bx * d_El + r * d_TH + tx])
                _scan_staged(bx * d_TS, d_TS, d_U, n_slots, r * d_TH + tx, loc, mine, cur, True, sorted_ids, slot_pos)

    return dispatch_count, dispatch_scan, dispatch_place

