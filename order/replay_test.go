package order

import (
	"bytes"
	"math"
	"strings"
	"testing"

	"github.com/cloudletfs/cloudletfs/overlay"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// layout: three segments of 1 MB stored (2 MB raw, no decode cost), chunk i
// of memory in segment i, disk chunks from the base.
func layout() *Layout {
	l := &Layout{MetadataBytes: 100_000, ChunkSize: 4096, Sizes: [2]int64{2 * 4096, 3 * 4096}}
	for range 3 {
		l.Segments = append(l.Segments, SegmentInfo{Stored: 1_000_000, Raw: 2_000_000, Codec: overlay.CodecNone})
	}
	l.segOf[overlay.Memory] = []int32{0, 1, 2}
	l.segOf[overlay.Disk] = []int32{-1, -1}
	return l
}

func TestReplayPolicies(t *testing.T) {
	m := Model{Rate: 1e6, RTT: 0.1, Decode: map[overlay.Codec]float64{}, Startup: 0}
	// ready = 2 RTT + 0.1 MB at 1 MB/s = 0.3 s
	tr := &Trace{
		Accesses: []Access{
			{Time: 0, Chunk: overlay.ChunkID{Image: overlay.Disk, Index: 0}},
			{Time: 0.05, Chunk: overlay.ChunkID{Image: overlay.Memory, Index: 2}},
		},
		Marks: []Mark{{Time: 0.06, Name: FirstResponse}},
	}
	l := layout()
	r := Replay(l, tr, m, StreamDemand)
	if !near(r.Ready, 0.3) {
		t.Fatalf("ready %v, want 0.3", r.Ready)
	}
	// The base chunk needs nothing. Segment 2 is demanded at 0.35 s: the
	// stream's fetch of segment 0 is cancelled and segment 2 arrives one
	// RTT and 1 MB later, at 1.45 s; the first response follows 0.01 s of
	// think time later.
	if !near(r.Served[0], 0.3) || !near(r.Served[1], 1.45) || !near(r.FirstResponse, 1.46) {
		t.Fatalf("stream+demand: served %v, first response %v", r.Served, r.FirstResponse)
	}
	if !near(r.Stall, 1.1) || !near(r.WaitTotal, 1.1) {
		t.Fatalf("stall %v, wait total %v, want 1.1 each", r.Stall, r.WaitTotal)
	}
	// Stream only: segments 0, 1, 2 in order, 1.1 s each.
	if r := Replay(l, tr, m, StreamOnly); !near(r.Served[1], 0.3+3*1.1) {
		t.Fatalf("stream: served %v", r.Served)
	}
	// Demand only: as stream+demand, with nothing to cancel.
	if r := Replay(l, tr, m, DemandOnly); !near(r.Served[1], 1.45) || len(r.Fetches) != 1 {
		t.Fatalf("demand-only: served %v, fetches %+v", r.Served, r.Fetches)
	}
	// Only segment 2's bytes were needed before the first response.
	if r.Needed != 4096/2 || !near(r.Limit(m), 0.002048+0.1) {
		t.Fatalf("needed %d, limit %v", r.Needed, r.Limit(m))
	}
	var svg bytes.Buffer
	if err := Plot(&svg, r, "test <plot>"); err != nil || !strings.Contains(svg.String(), "first response 1.46s") || !strings.Contains(svg.String(), "&lt;plot&gt;") {
		t.Fatalf("plot: %v\n%s", err, svg.String())
	}
}

func TestReplayStallIsWallClock(t *testing.T) {
	// Two reads wait for segment 2 at once. The recorded run says the first
	// read took 0.5 s, so the second was issued while it waited: the first
	// waits from 0.35 s to 1.45 s, the second from 0.96 s to 1.45 s. The
	// waits add up to 1.59 s; the VM stood still for 1.1 s of it.
	m := Model{Rate: 1e6, RTT: 0.1, Decode: map[overlay.Codec]float64{}}
	l := layout()
	l.segOf[overlay.Memory] = []int32{2, 1, 2}
	tr := &Trace{Accesses: []Access{
		{Time: 0.05, Chunk: overlay.ChunkID{Image: overlay.Memory, Index: 2}, Wait: 0.5},
		{Time: 0.06, Chunk: overlay.ChunkID{Image: overlay.Memory, Index: 0}},
	}}
	r := Replay(l, tr, m, StreamDemand)
	if !near(r.Issued[1], 0.96) || !near(r.Served[1], 1.45) {
		t.Fatalf("issued %v, served %v", r.Issued, r.Served)
	}
	if !near(r.WaitTotal, 1.59) || !near(r.Stall, 1.1) {
		t.Fatalf("wait total %v, stall %v; want 1.59 and 1.1", r.WaitTotal, r.Stall)
	}
}

func TestReplayThinkTime(t *testing.T) {
	// The second access came 1 s after the first, whose read took 0.5 s
	// in the recorded run. The replay serves the first read at once, but
	// does not pull the second forward: the recorded wait may have
	// overlapped other work of the VM.
	l := layout()
	m := Model{Rate: 1e9, RTT: 0, Decode: map[overlay.Codec]float64{}}
	tr := &Trace{Accesses: []Access{
		{Time: 0, Chunk: overlay.ChunkID{Image: overlay.Disk, Index: 0}, Wait: 0.5},
		{Time: 1, Chunk: overlay.ChunkID{Image: overlay.Disk, Index: 1}},
	}}
	r := Replay(l, tr, m, StreamDemand)
	if !near(r.Issued[1]-r.Issued[0], 1) {
		t.Fatalf("issued %v", r.Issued)
	}
	// A stall longer than recorded pushes every later access back.
	tr.Accesses[0].Chunk = overlay.ChunkID{Image: overlay.Memory, Index: 0}
	tr.Accesses[0].Wait = 0
	m.RTT = 0.25
	r = Replay(l, tr, m, StreamDemand)
	if stall := r.Served[0] - r.Issued[0]; stall <= 0 || !near(r.Issued[1]-r.Issued[0], 1+stall) {
		t.Fatalf("issued %v, served %v", r.Issued, r.Served)
	}
}

func TestMerge(t *testing.T) {
	c := func(i uint32) overlay.ChunkID { return overlay.ChunkID{Image: overlay.Memory, Index: i} }
	runs := []*Trace{
		{Accesses: []Access{{Time: 1, Chunk: c(1)}, {Time: 2, Chunk: c(2)}, {Time: 4, Chunk: c(3)}}, Marks: []Mark{{Time: 5, Name: FirstResponse}}},
		{Accesses: []Access{{Time: 3, Chunk: c(1)}, {Time: 0.5, Chunk: c(3)}}, Marks: []Mark{{Time: 3, Name: FirstResponse}}},
		{Accesses: []Access{{Time: 2, Chunk: c(1)}, {Time: 6, Chunk: c(3)}, {Time: 1, Chunk: c(4)}}},
	}
	times := func(tr *Trace) map[overlay.ChunkID]float64 {
		m := map[overlay.ChunkID]float64{}
		for _, a := range tr.Accesses {
			m[a.Chunk] = a.Time
		}
		return m
	}
	e, err := Merge(runs, Earliest, 1)
	if err != nil {
		t.Fatal(err)
	}
	if got := times(e); got[c(1)] != 1 || got[c(3)] != 0.5 || got[c(4)] != 1 || len(got) != 4 {
		t.Fatalf("earliest: %v", got)
	}
	if e.Accesses[0].Chunk != c(3) {
		t.Fatalf("earliest order starts with %v", e.Accesses[0].Chunk)
	}
	md, _ := Merge(runs, Median, 2)
	if got := times(md); got[c(1)] != 2 || got[c(3)] != 4 || len(got) != 2 {
		t.Fatalf("median, in at least 2 runs: %v", got)
	}
	if m, _ := md.Mark(FirstResponse); m != 4 {
		t.Fatalf("merged mark %v, want the median 4", m)
	}
	// weighted: chunk 2 was seen only in run 1 (at 2); runs 2 and 3 end at
	// 3 and 6, so it counts (2 + (4+3+6)*2/3) / 3.
	w, _ := Merge(runs, Weighted, 1)
	if got := times(w); !near(got[c(2)], (2+13.0*2/3)/3) || !near(got[c(1)], 2) {
		t.Fatalf("weighted: %v", got)
	}
	if _, err := Merge(runs, Median, 4); err == nil {
		t.Fatal("min-runs above the run count kept chunks")
	}
	if _, err := ParseStrategy("latest"); err == nil {
		t.Fatal("unknown strategy accepted")
	}
	s := Summarize(runs[0], 4096, 2)
	if s.Chunks[overlay.Memory] != 3 || s.Start != 1 || s.End != 4 || s.WorkingSet[1].Bytes != 3*4096 {
		t.Fatalf("summary %+v", s)
	}
}
