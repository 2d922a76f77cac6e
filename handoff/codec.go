package handoff

import (
	"sync"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// chooser picks the encoder of each segment sent ahead: the one that
// moves the most raw bytes a second through the link, as limited by its
// own speed on this machine's CPU (what compressing costs now, under the
// load it is under) and by the link's measured rate divided by its ratio.
// Elijah chose among compressors and levels per stage the same way. Every
// probeEvery segments it measures every encoder again on the segment at
// hand, so that a change of link or load is followed.
type chooser struct {
	mu       sync.Mutex // guards linkRate, which pushers set
	stats    map[*overlay.Encoder]*encStat
	linkRate float64 // bytes a second, measured by pushes; 0 until one is
	cur      *overlay.Encoder
	n        int
}

type encStat struct {
	speed float64 // raw bytes a second
	ratio float64 // stored / raw
}

const probeEvery = 16

// assumedRate stands in for the link's rate before a push has measured it.
const assumedRate = 25e6 / 8

func newChooser() *chooser {
	return &chooser{stats: map[*overlay.Encoder]*encStat{}, cur: overlay.Encoders[2]}
}

// encode compresses raw with the encoder of the moment, probing all of
// them first when it is time to. It returns the stored bytes, the encoder
// used, and whether the choice changed.
func (c *chooser) encode(raw []byte) ([]byte, *overlay.Encoder, bool, error) {
	probe := c.n%probeEvery == 0
	c.n++
	if !probe {
		t := time.Now()
		out, err := c.cur.Encode(raw)
		if err == nil {
			c.note(c.cur, len(raw), len(out), time.Since(t))
		}
		return out, c.cur, false, err
	}
	outs := map[*overlay.Encoder][]byte{}
	for _, e := range overlay.Encoders {
		t := time.Now()
		out, err := e.Encode(raw)
		if err != nil {
			return nil, nil, false, err
		}
		c.note(e, len(raw), len(out), time.Since(t))
		outs[e] = out
	}
	prev := c.cur
	c.cur = c.pick()
	return outs[c.cur], c.cur, prev != c.cur, nil
}

func (c *chooser) note(e *overlay.Encoder, raw, stored int, took time.Duration) {
	s := c.stats[e]
	speed := float64(raw) / max(took.Seconds(), 1e-6)
	ratio := float64(stored) / float64(max(raw, 1))
	if s == nil {
		c.stats[e] = &encStat{speed: speed, ratio: ratio}
		return
	}
	s.speed = 0.7*s.speed + 0.3*speed
	s.ratio = 0.7*s.ratio + 0.3*ratio
}

// measured records the link's rate: n stored bytes pushed in d of time
// with pushes under way.
func (c *chooser) measured(n int64, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d <= 0 || n < 64<<10 {
		return // too little to time the link by
	}
	c.linkRate = float64(n) / d.Seconds()
}

// pick returns the encoder with the best throughput: min(speed, link /
// ratio).
func (c *chooser) pick() *overlay.Encoder {
	link := c.rate()
	if link == 0 {
		link = assumedRate
	}
	best, bestRate := c.cur, 0.0
	for _, e := range overlay.Encoders {
		s := c.stats[e]
		if s == nil {
			continue
		}
		if r := min(s.speed, link/max(s.ratio, 1e-3)); r > bestRate {
			best, bestRate = e, r
		}
	}
	return best
}

func (c *chooser) rate() float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.linkRate
}
