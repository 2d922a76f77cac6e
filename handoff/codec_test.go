package handoff

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// The chooser takes the encoder that moves the most raw bytes a second:
// on a slow link one that compresses well, on a fast one the fastest, and
// none at all for data that does not compress.
func TestChooserFollowsTheLink(t *testing.T) {
	text := bytes.Repeat([]byte("the guest's page cache holds text like this, and code, and zeros. "), 1000)
	random := make([]byte, 64<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	for _, tc := range []struct {
		name string
		rate float64 // bytes a second
		raw  []byte
		want func(e *overlay.Encoder) bool
	}{
		{"slow link, compressible", 10e6 / 8, text, func(e *overlay.Encoder) bool { return e.Codec != overlay.CodecNone }},
		{"no link limit, compressible", 1e12, text, nil}, // the fastest, whichever it is
		{"slow link, incompressible", 10e6 / 8, random, func(e *overlay.Encoder) bool { return e.Name == "none" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newChooser()
			c.measured(1<<20, time.Duration(float64(1<<20)/tc.rate*float64(time.Second)))
			_, e, _, err := c.encode(tc.raw)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want == nil {
				for _, o := range overlay.Encoders {
					if c.stats[o].speed > c.stats[e].speed {
						t.Fatalf("chose %s, slower than %s on a link that does not limit (%s)", e.Name, o.Name, c.describe())
					}
				}
				return
			}
			if !tc.want(e) {
				t.Fatalf("chose %s (%s)", e.Name, c.describe())
			}
		})
	}
}
