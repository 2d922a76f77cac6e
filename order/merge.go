package order

import (
	"fmt"
	"sort"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Strategy says how runs are combined into one order. Each run contributes
// the first access of each chunk it touched.
type Strategy string

// The strategies. A chunk's place is its merged first-access time:
//   - earliest: the earliest time any run touched it;
//   - median: the median over the runs that touched it;
//   - weighted: the mean over all runs, where a run that never touched the
//     chunk counts the end of that run, so chunks most runs need early come
//     first and chunks only some runs need move back.
const (
	Earliest Strategy = "earliest"
	Median   Strategy = "median"
	Weighted Strategy = "weighted"
)

// Strategies lists them, for help texts and tuning.
var Strategies = []Strategy{Earliest, Median, Weighted}

// ParseStrategy checks a strategy name.
func ParseStrategy(s string) (Strategy, error) {
	for _, k := range Strategies {
		if string(k) == s {
			return k, nil
		}
	}
	return "", fmt.Errorf("strategy %q: want earliest, median or weighted", s)
}

// Merge combines runs into one trace with one access per chunk, timed by
// the strategy. Chunks seen in fewer than minRuns runs are left out. Each
// mark is the median of that mark over the runs that have it.
func Merge(runs []*Trace, s Strategy, minRuns int) (*Trace, error) {
	if len(runs) == 0 {
		return nil, ErrEmpty
	}
	type seen struct {
		times []float64
		bytes int
	}
	chunks := map[overlay.ChunkID]*seen{}
	ends := make([]float64, len(runs))
	marks := map[string][]float64{}
	for r, t := range runs {
		first := map[overlay.ChunkID]bool{}
		for _, a := range t.Accesses {
			ends[r] = max(ends[r], a.Time)
		}
		for _, a := range firstAccesses(t.Accesses) {
			if first[a.Chunk] {
				continue
			}
			first[a.Chunk] = true
			c := chunks[a.Chunk]
			if c == nil {
				c = &seen{}
				chunks[a.Chunk] = c
			}
			c.times = append(c.times, a.Time)
			c.bytes = max(c.bytes, a.Bytes)
		}
		for _, m := range t.Marks {
			marks[m.Name] = append(marks[m.Name], m.Time)
		}
	}
	out := &Trace{}
	for id, c := range chunks {
		if len(c.times) < minRuns {
			continue
		}
		var t float64
		switch s {
		case Earliest:
			t = c.times[0]
			for _, x := range c.times {
				t = min(t, x)
			}
		case Median:
			t = median(c.times)
		case Weighted:
			sum := 0.0
			for _, x := range c.times {
				sum += x
			}
			// Runs that never touched the chunk count their end.
			missing := 0.0
			for _, e := range ends {
				missing += e
			}
			sum += missing * float64(len(runs)-len(c.times)) / float64(len(runs))
			t = sum / float64(len(runs))
		default:
			return nil, fmt.Errorf("strategy %q: want earliest, median or weighted", s)
		}
		out.Accesses = append(out.Accesses, Access{Time: t, Chunk: id, Bytes: c.bytes})
	}
	if len(out.Accesses) == 0 {
		return nil, fmt.Errorf("no chunk was seen in %d runs: %w", minRuns, ErrEmpty)
	}
	sort.Slice(out.Accesses, func(i, j int) bool {
		a, b := out.Accesses[i], out.Accesses[j]
		if a.Time != b.Time {
			return a.Time < b.Time
		}
		if a.Chunk.Image != b.Chunk.Image {
			return a.Chunk.Image < b.Chunk.Image
		}
		return a.Chunk.Index < b.Chunk.Index
	})
	for name, ts := range marks {
		out.Marks = append(out.Marks, Mark{Time: median(ts), Name: name})
	}
	sort.Slice(out.Marks, func(i, j int) bool { return out.Marks[i].Time < out.Marks[j].Time })
	return out, nil
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	} else {
		return (s[n/2-1] + s[n/2]) / 2
	}
}

// firstAccesses returns the accesses sorted by time, stable.
func firstAccesses(acc []Access) []Access {
	s := append([]Access(nil), acc...)
	sort.SliceStable(s, func(i, j int) bool { return s[i].Time < s[j].Time })
	return s
}

// Summary describes a trace for `trace show`.
type Summary struct {
	Chunks     [2]int
	Bytes      [2]int64 // chunks × chunk size
	Start, End float64
	// WorkingSet is the distinct bytes touched by each time, in steps.
	WorkingSet []struct {
		Time  float64
		Bytes int64
	}
}

// Summarize counts a trace's distinct chunks per image and the working set
// over time, in steps points.
func Summarize(t *Trace, chunkSize int, steps int) Summary {
	var s Summary
	acc := firstAccesses(t.Accesses)
	seen := map[overlay.ChunkID]bool{}
	var times []float64
	for _, a := range acc {
		if seen[a.Chunk] {
			continue
		}
		seen[a.Chunk] = true
		s.Chunks[a.Chunk.Image]++
		s.Bytes[a.Chunk.Image] += int64(chunkSize)
		times = append(times, a.Time)
	}
	if len(times) == 0 {
		return s
	}
	s.Start, s.End = times[0], times[len(times)-1]
	for i := 1; i <= steps; i++ {
		at := s.Start + (s.End-s.Start)*float64(i)/float64(steps)
		n := sort.Search(len(times), func(j int) bool { return times[j] > at })
		s.WorkingSet = append(s.WorkingSet, struct {
			Time  float64
			Bytes int64
		}{at, int64(n) * int64(chunkSize)})
	}
	return s
}
