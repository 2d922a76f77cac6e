package overlay

import (
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"testing"
)

var benchWords = []string{"the", "cloudlet", "virtual", "machine", "resume", "overlay", "kernel",
	"memory", "disk", "network", "server", "request", "response", "cache", "process", "buffer",
	"error", "info", "open", "close", "read", "write", "/usr/lib", "HTTP/1.1", "200", "OK"}

// benchSegment returns a 1 MiB segment of 4 KiB pages: about 30% text, 40%
// binary (zeros, small integers and repeated words mixed with random ones),
// 15% random bytes and 15% pages that are mostly zero. The bytes are always
// the same.
func benchSegment() []byte {
	const page = 4096
	rng := rand.New(rand.NewPCG(1, 1))
	raw := make([]byte, DefaultSegment)
	for o := 0; o < len(raw); o += page {
		p := raw[o : o+page]
		switch k := rng.IntN(100); {
		case k < 30:
			for i := 0; i < page; {
				i += copy(p[i:], benchWords[rng.IntN(len(benchWords))])
				if i < page {
					p[i] = ' '
					if rng.IntN(12) == 0 {
						p[i] = '\n'
					}
					i++
				}
			}
		case k < 70:
			for i := 0; i < page; i += 8 {
				v := rng.Uint64()
				switch v & 3 {
				case 0:
					v = 0
				case 1:
					v >>= 56
				case 2:
					v = 0x48894c2408ec8348 ^ v>>60
				}
				binary.LittleEndian.PutUint64(p[i:], v)
			}
		case k < 85:
			for i := 0; i < page; i += 8 {
				binary.LittleEndian.PutUint64(p[i:], rng.Uint64())
			}
		default:
			for range 8 {
				binary.LittleEndian.PutUint64(p[rng.IntN(page/8)*8:], rng.Uint64()>>rng.IntN(64))
			}
		}
	}
	return raw
}

// warmHeap runs f until the garbage collector has finished two cycles, so
// that the timed loop reuses heap pages as a long build or extract does,
// instead of faulting in fresh ones: on a VM that costs more per page than
// zstd takes to decode it.
func warmHeap(b *testing.B, f func() error) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	for n := ms.NumGC + 2; ms.NumGC < n; runtime.ReadMemStats(&ms) {
		if err := f(); err != nil {
			b.Fatal(err)
		}
	}
}

var benchCodecs = []struct {
	name  string
	codec Codec
}{{"xz", CodecXZ}, {"zstd", CodecZstd}}

// BenchmarkSegmentDecode measures decoding one segment; MB/s counts decoded
// bytes.
func BenchmarkSegmentDecode(b *testing.B) {
	raw := benchSegment()
	for _, bc := range benchCodecs {
		b.Run(bc.name, func(b *testing.B) {
			comp, err := compress(bc.codec, raw)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(raw)))
			warmHeap(b, func() error {
				_, err := decompress(bc.codec, comp, len(raw))
				return err
			})
			for b.Loop() {
				out, err := decompress(bc.codec, comp, len(raw))
				if err != nil || len(out) != len(raw) {
					b.Fatalf("decoded %d bytes, want %d: %v", len(out), len(raw), err)
				}
			}
			// After the loop: b.Loop resets the timer, which drops metrics.
			b.ReportMetric(float64(len(raw))/float64(len(comp)), "ratio")
		})
	}
}

// BenchmarkSegmentEncode measures compressing one segment; MB/s counts raw
// bytes.
func BenchmarkSegmentEncode(b *testing.B) {
	raw := benchSegment()
	for _, bc := range benchCodecs {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(raw)))
			warmHeap(b, func() error {
				_, err := compress(bc.codec, raw)
				return err
			})
			var comp []byte
			for b.Loop() {
				var err error
				if comp, err = compress(bc.codec, raw); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(raw))/float64(len(comp)), "ratio")
		})
	}
}
