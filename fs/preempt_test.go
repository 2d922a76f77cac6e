package fs_test

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// preemptFactor is how much longer than the same demand read through an
// idle mount a demand read may take while the stream runs. Sharing the
// link with the stream's segment, instead of cancelling it, takes about
// twice as long.
const preemptFactor = 1.5

// A demand read jumps the stream: the stream's segment in flight is
// cancelled, so the read takes about what the same read takes through a
// mount with no stream, measured in the same run (FUSE, the transfer on
// the emulated link, decoding and caching the segment), rather than
// sharing the link with the stream.
func TestDemandPreemptsStream(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 256<<10)
	// About 4 MB at 4 Mbit/s: the stream alone would take 8 seconds, each
	// segment about half a second.
	srv := newServer(t, filepath.Dir(v.overlay), mbit(4), 2*time.Millisecond)
	last := len(v.segments) - 1
	sg := v.segments[last]
	demandRead := func(m *mounted) time.Duration {
		t.Helper()
		o := m.f.Overlay()
		id := o.Manifest.Order[sg.First]
		off := int64(id.Index) * int64(o.Header.ChunkSize)
		start := time.Now()
		got, err := m.readAt(id.Image, off, 4096)
		took := time.Since(start)
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		if !bytes.Equal(got, v.want[id.Image][off:off+int64(len(got))]) {
			t.Fatal("demand read returned the wrong bytes")
		}
		return took
	}

	// The bound: the same read through a mount with no stream.
	idle, err := v.mountWith(t, srv.URL+"/app.overlay", 30*time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	alone := demandRead(idle)
	idle.unmount()
	v.resetCache(t)
	bound := time.Duration(preemptFactor * float64(alone))

	// The demand goes out just as the stream's request for segment 1
	// reaches the server, so without preemption it would share the link
	// with a whole segment.
	streaming := make(chan struct{})
	var once sync.Once
	srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if sp, ok := requestSpan(r); ok && sp.off == v.segments[1].Offset {
			once.Do(func() { close(streaming) })
		}
		return false
	})
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-streaming:
	case <-time.After(20 * time.Second):
		t.Fatal("the stream did not reach segment 1 within 20 s")
	}
	took := demandRead(m)
	t.Logf("demand read of segment %d (%d bytes) took %s while the stream ran; through an idle mount %s; bound %s",
		last, sg.Stored, took.Round(time.Millisecond), alone.Round(time.Millisecond), bound.Round(time.Millisecond))
	if took > bound {
		t.Errorf("demand read took %s while the stream ran, want within %.1f x %s (the same read through an idle mount)", took, preemptFactor, alone)
	}
	if st := m.f.Stats(); st.StreamPreemptions == 0 || st.DemandFetches != 1 {
		t.Fatalf("want the stream preempted by one demand fetch: %+v", st)
	}
	// The first request is the measurement's.
	reqs := srv.segmentRequests(v.segments)[1:]
	count, at := 0, -1
	for i, s := range reqs {
		if s == last {
			count++
			if at < 0 {
				at = i
			}
		}
	}
	if count != 1 {
		t.Fatalf("the last segment was requested %d times, want once (requests %v)", count, reqs)
	}
	// Before the demand, the stream had reached only the first few segments.
	for _, s := range reqs[:at] {
		if s > last/2 {
			t.Fatalf("stream reached segment %d before the demand for segment %d was served: %v", s, last, reqs)
		}
	}
}
