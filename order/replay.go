package order

import (
	"fmt"
	"math"
	"sort"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Layout is what the simulator needs of an overlay: the metadata size, the
// segments, and which segment carries each chunk's bytes.
type Layout struct {
	MetadataBytes int64
	ChunkSize     int64
	Sizes         [2]int64 // image sizes, for the short last chunk
	Segments      []SegmentInfo
	segOf         [2][]int32 // -1: zero or base, no fetch needed
}

// SegmentInfo is one segment's size on the wire and decoded.
type SegmentInfo struct {
	Stored, Raw int64
	Codec       overlay.Codec
}

// chunkLen is the length of chunk c: the chunk size, or less for the last
// chunk of an image.
func (l *Layout) chunkLen(c overlay.ChunkID) int64 {
	return min(l.ChunkSize, l.Sizes[c.Image]-int64(c.Index)*l.ChunkSize)
}

// LayoutOf describes an overlay as it is.
func LayoutOf(o *overlay.Overlay) *Layout {
	l := &Layout{MetadataBytes: o.Header.MetadataLen(), ChunkSize: int64(o.Header.ChunkSize),
		Sizes: [2]int64{o.Header.ImageSize(overlay.Disk), o.Header.ImageSize(overlay.Memory)}}
	for _, s := range o.Manifest.Segments {
		l.Segments = append(l.Segments, SegmentInfo{Stored: int64(s.Stored), Raw: int64(s.Raw), Codec: s.Codec})
	}
	m := o.Manifest
	for _, img := range overlay.Images {
		l.segOf[img] = make([]int32, len(m.Refs[img]))
		for i, r := range m.Refs[img] {
			l.segOf[img][i] = -1
			switch r.Kind {
			case overlay.Data:
				l.segOf[img][i] = int32(m.SegmentOf(int(r.Index)))
			case overlay.Self:
				l.segOf[img][i] = int32(m.SegmentOf(int(m.Refs[r.Image][r.Index].Index)))
			}
		}
	}
	return l
}

// Resegment predicts the layout of o reordered with first coming first and
// cut into segments of segSize raw bytes, without compressing anything:
// each segment's stored size is its raw size times o's compression ratio.
func Resegment(o *overlay.Overlay, first []overlay.ChunkID, segSize int64) *Layout {
	m, h := o.Manifest, o.Header
	var stored, raw int64
	for _, s := range m.Segments {
		stored += int64(s.Stored)
		raw += int64(s.Raw)
	}
	ratio := 1.0
	if raw > 0 {
		ratio = float64(stored) / float64(raw)
	}
	codec := overlay.CodecXZ
	if len(m.Segments) > 0 {
		codec = m.Segments[0].Codec
	}
	// The data chunk behind each chunk the order names, then the rest in
	// o's order, each once.
	target := func(c overlay.ChunkID) (overlay.ChunkID, bool) {
		r := m.Refs[c.Image][c.Index]
		switch r.Kind {
		case overlay.Data:
			return c, true
		case overlay.Self:
			return overlay.ChunkID{Image: r.Image, Index: r.Index}, true
		}
		return c, false
	}
	// Each content travels once, carried by the first chunk the order
	// names with it, as Build would do.
	placed := map[overlay.ChunkID]int32{}
	var seq, carrier []overlay.ChunkID
	for _, c := range append(append([]overlay.ChunkID(nil), first...), m.Order...) {
		if int(c.Index) >= len(m.Refs[c.Image]) {
			continue
		}
		if t, ok := target(c); ok {
			if _, done := placed[t]; !done {
				placed[t] = -1
				seq = append(seq, t)
				carrier = append(carrier, c)
			}
		}
	}
	l := &Layout{MetadataBytes: h.MetadataLen(), ChunkSize: int64(h.ChunkSize),
		Sizes: [2]int64{h.ImageSize(overlay.Disk), h.ImageSize(overlay.Memory)}}
	segSize = max(l.ChunkSize, segSize/l.ChunkSize*l.ChunkSize) // whole chunks, as Build cuts
	var cur int64
	for i, c := range seq {
		n := h.ChunkLen(carrier[i])
		if len(l.Segments) == 0 || cur+n > segSize && cur > 0 {
			l.Segments = append(l.Segments, SegmentInfo{Codec: codec})
			cur = 0
		}
		s := &l.Segments[len(l.Segments)-1]
		s.Raw += n
		cur += n
		placed[c] = int32(len(l.Segments) - 1)
	}
	for i := range l.Segments {
		l.Segments[i].Stored = int64(math.Ceil(float64(l.Segments[i].Raw) * ratio))
	}
	for _, img := range overlay.Images {
		l.segOf[img] = make([]int32, len(m.Refs[img]))
		for i := range m.Refs[img] {
			l.segOf[img][i] = -1
			if t, ok := target(overlay.ChunkID{Image: img, Index: uint32(i)}); ok {
				l.segOf[img][i] = placed[t]
			}
		}
	}
	return l
}

// Policy is how segments are fetched.
type Policy string

// The policies the mount can run.
const (
	DemandOnly   Policy = "demand-only"
	StreamOnly   Policy = "stream"
	StreamDemand Policy = "stream+demand"
)

// ParsePolicy checks a policy name.
func ParsePolicy(s string) (Policy, error) {
	switch Policy(s) {
	case DemandOnly, StreamOnly, StreamDemand:
		return Policy(s), nil
	}
	return "", fmt.Errorf("policy %q: want demand-only, stream or stream+demand", s)
}

// Model is the link and the cloudlet: the link's rate in bytes per second,
// its round-trip time, decode speed per codec in bytes per second, and the
// fixed local cost of a mount (store, base index, FUSE) in seconds.
type Model struct {
	Rate    float64
	RTT     float64
	Decode  map[overlay.Codec]float64
	Startup float64
}

// DefaultDecode is the decode speed measured on one core here
// (docs/BENCHMARKS.md).
var DefaultDecode = map[overlay.Codec]float64{overlay.CodecNone: 5e9, overlay.CodecXZ: 22e6, overlay.CodecZstd: 1.5e9}

// Fetch is one segment transfer in a replay.
type Fetch struct {
	Segment    int
	Start, End float64 // on the link
	Ready      float64 // decoded and usable
	Demand     bool
	Cancelled  bool
}

// Result is a replay's prediction. Times are seconds from the start of the
// mount.
type Result struct {
	Ready         float64   // the mount is ready and QEMU can resume
	Issued        []float64 // per access of the trace, in time order
	Served        []float64
	FirstResponse float64 // -1 if the trace has no first-response mark
	// Stall is the wall-clock time in which at least one read waited for
	// the network; WaitTotal is the sum of every read's wait, which counts
	// an instant twice when two reads wait in it. They are stall_ms and
	// wait_total_ms in a mount's stats.
	Stall        float64
	WaitTotal    float64
	BytesFetched int64
	// Needed is the compressed bytes of the chunks the VM read before its
	// first response (all of them without a mark): with one RTT, the
	// physical limit of any fetch order on this link.
	Needed   int64
	Fetches  []Fetch
	Accesses []Access // the trace's first accesses, in time order
}

// Limit is the physical limit of a first response on model m: the bytes
// needed, at the link's rate, plus one round trip.
func (r Result) Limit(m Model) float64 { return float64(r.Needed)/m.Rate + m.RTT }

// Replay predicts a launch: the accesses of t happen with the think time
// between them that the trace shows (its times minus the time each read
// itself took), over the link of m, with segments fetched by policy p.
func Replay(l *Layout, t *Trace, m Model, p Policy) Result {
	dec := func(s int) float64 {
		if r := m.Decode[l.Segments[s].Codec]; r > 0 {
			return float64(l.Segments[s].Raw) / r
		}
		return 0
	}
	xfer := func(s int) float64 { return m.RTT + float64(l.Segments[s].Stored)/m.Rate }
	res := Result{FirstResponse: -1}
	res.Ready = m.Startup + 2*m.RTT + float64(l.MetadataBytes)/m.Rate
	res.BytesFetched = l.MetadataBytes
	present := make([]float64, len(l.Segments))
	for i := range present {
		present[i] = math.Inf(1)
	}
	linkFree := res.Ready
	next := 0
	inflight := -1 // stream fetch under way: index into res.Fetches
	stream := p != DemandOnly

	// advance lets the streamer run until time until.
	advance := func(until float64) {
		for stream {
			if inflight >= 0 {
				f := &res.Fetches[inflight]
				if f.End > until {
					return
				}
				present[f.Segment] = min(present[f.Segment], f.Ready)
				res.BytesFetched += l.Segments[f.Segment].Stored
				linkFree = f.End
				inflight = -1
			}
			for next < len(present) && !math.IsInf(present[next], 1) {
				next++
			}
			if next == len(present) || linkFree > until {
				return
			}
			end := linkFree + xfer(next)
			res.Fetches = append(res.Fetches, Fetch{Segment: next, Start: linkFree, End: end, Ready: end + dec(next)})
			inflight = len(res.Fetches) - 1
		}
	}

	acc := firstAccesses(t.Accesses)
	seen := map[overlay.ChunkID]bool{}
	res.Accesses = acc[:0:0]
	var mark float64 = -1
	if mt, ok := t.Mark(FirstResponse); ok {
		mark = mt
	}
	shift := 0.0 // how much later than recorded the VM runs
	for _, a := range acc {
		if seen[a.Chunk] || int(a.Chunk.Index) >= len(l.segOf[a.Chunk.Image]) {
			continue
		}
		seen[a.Chunk] = true
		if mark >= 0 && a.Time > mark && res.FirstResponse < 0 {
			res.FirstResponse = res.Ready + mark + shift
		}
		issue := res.Ready + a.Time + shift
		if s := l.segOf[a.Chunk.Image][a.Chunk.Index]; s >= 0 && (mark < 0 || a.Time <= mark) {
			seg := l.Segments[s]
			res.Needed += l.chunkLen(a.Chunk) * seg.Stored / max(1, seg.Raw)
		}
		advance(issue)
		served := issue
		if s := int(l.segOf[a.Chunk.Image][a.Chunk.Index]); s >= 0 && present[s] > issue {
			switch {
			case !math.IsInf(present[s], 1):
				served = present[s] // a demand fetch of it is under way
			case inflight >= 0 && res.Fetches[inflight].Segment == s:
				served = res.Fetches[inflight].Ready
				if p == StreamOnly {
					advance(served)
				}
			case p == StreamOnly:
				for math.IsInf(present[s], 1) {
					advance(math.Inf(1))
				}
				served = present[s]
			default:
				start := max(issue, linkFree)
				if inflight >= 0 {
					// The demand cancels the stream's fetch; the bytes
					// already sent are spent.
					f := &res.Fetches[inflight]
					f.Cancelled = true
					f.End = issue
					res.BytesFetched += int64(max(0, issue-f.Start-m.RTT) * m.Rate)
					inflight = -1
					start = issue
				}
				end := start + xfer(s)
				res.Fetches = append(res.Fetches, Fetch{Segment: s, Start: start, End: end, Ready: end + dec(s), Demand: true})
				res.BytesFetched += l.Segments[s].Stored
				present[s] = end + dec(s)
				linkFree = end
				served = present[s]
			}
		}
		wait := served - issue
		res.WaitTotal += wait
		shift += max(0, wait-a.Wait)
		res.Issued = append(res.Issued, issue)
		res.Served = append(res.Served, served)
		res.Accesses = append(res.Accesses, a)
	}
	if mark >= 0 && res.FirstResponse < 0 {
		res.FirstResponse = res.Ready + mark + shift
	}
	res.Stall = covered(res.Issued, res.Served)
	sort.Slice(res.Fetches, func(i, j int) bool { return res.Fetches[i].Start < res.Fetches[j].Start })
	return res
}

// covered is the length of the union of the intervals [from[i], to[i]].
func covered(from, to []float64) float64 {
	idx := make([]int, len(from))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return from[idx[a]] < from[idx[b]] })
	total, end := 0.0, math.Inf(-1)
	for _, i := range idx {
		start := max(from[i], end)
		if to[i] > start {
			total += to[i] - start
		}
		end = max(end, to[i])
	}
	return total
}
