package fs

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// eventLog is a growing text file of events, one a line, that a reader can
// follow like `tail -f`. It keeps at least the newest maxLog bytes and at
// most twice that; offsets keep counting, so a follower never sees a line
// twice.
type eventLog struct {
	mu    sync.Mutex
	buf   []byte
	first int64 // offset of buf[0]
}

const maxLog = 4 << 20

func (l *eventLog) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, line...)
	// Trimming only past twice the limit keeps the copy it costs to once
	// per maxLog bytes logged, rather than once per line.
	if len(l.buf) > 2*maxLog {
		over := len(l.buf) - maxLog
		// Drop whole lines from the front.
		for over < len(l.buf) && l.buf[over-1] != '\n' {
			over++
		}
		l.first += int64(over)
		l.buf = append(l.buf[:0], l.buf[over:]...)
	}
}

func (l *eventLog) size() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first + int64(len(l.buf))
}

// readAt copies what it holds at off into p.
func (l *eventLog) readAt(p []byte, off int64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if off < l.first {
		off = l.first
	}
	rel := off - l.first
	if rel >= int64(len(l.buf)) {
		return 0
	}
	return copy(p, l.buf[rel:])
}

// traceBlock is how many accesses a block of the trace holds.
const traceBlock = 1 << 14

// recorder notes every access: the first touch of each chunk goes into the
// trace and streams/chunks_accessed, every read and write into streams/io.
type recorder struct {
	start atomic.Int64 // unix nanoseconds of the mount being ready

	mu       sync.Mutex
	seen     [2][]bool
	modified [2][]bool
	trace    [][]order.Access // in blocks of traceBlock, so it never grows by copying
	touched  int
	marks    []order.Mark

	accessed, fetched, modifiedLog, io eventLog
}

func newRecorder(h *overlay.Header) *recorder {
	r := &recorder{}
	r.ready()
	for _, img := range overlay.Images {
		r.seen[img] = make([]bool, h.Chunks(img))
		r.modified[img] = make([]bool, h.Chunks(img))
	}
	return r
}

// ready sets the time that trace times count from.
func (r *recorder) ready() { r.start.Store(time.Now().UnixNano()) }

func (r *recorder) since() float64 {
	return float64(time.Now().UnixNano()-r.start.Load()) / 1e9
}

// touch records accesses to chunks first..last of img by op ("read" or
// "write"), which started at t (seconds since ready) and took wait seconds.
func (r *recorder) touch(img overlay.Image, op string, off int64, n int, first, last uint32, t, wait float64) {
	r.io.add(fmt.Sprintf("%.6f %s %s %d %d\n", t, op, img, off, n))
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := first; i <= last; i++ {
		if !r.seen[img][i] {
			r.seen[img][i] = true
			if r.touched%traceBlock == 0 {
				r.trace = append(r.trace, make([]order.Access, 0, traceBlock))
			}
			b := &r.trace[len(r.trace)-1]
			*b = append(*b, order.Access{Time: t, Chunk: overlay.ChunkID{Image: img, Index: i}, Bytes: n, Wait: wait})
			r.touched++
			r.accessed.add(fmt.Sprintf("%.6f %s %d\n", t, img, i))
		}
		if op == "write" && !r.modified[img][i] {
			r.modified[img][i] = true
			r.modifiedLog.add(fmt.Sprintf("%.6f %s %d\n", t, img, i))
		}
	}
}

// arrived records the chunks of a fetched segment.
func (r *recorder) arrived(seg int, ids []overlay.ChunkID, demand bool) {
	t := r.since()
	how := "stream"
	if demand {
		how = "demand"
	}
	for _, id := range ids {
		r.fetched.add(fmt.Sprintf("%.6f %s %d segment=%d %s\n", t, id.Image, id.Index, seg, how))
	}
}

// mark records a named moment.
func (r *recorder) mark(name string) {
	t := r.since()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.marks = append(r.marks, order.Mark{Time: t, Name: name})
}

// writeTrace writes the trace so far in the trace format without joining
// its blocks: the blocks are only ever appended to, so their views taken
// under the lock stay valid.
func (r *recorder) writeTrace(w io.Writer) error {
	r.mu.Lock()
	marks := append([]order.Mark(nil), r.marks...)
	blocks := append([][]order.Access(nil), r.trace...)
	r.mu.Unlock()
	return order.WriteBlocks(w, marks, blocks...)
}

// Trace returns the first access of every chunk touched so far, and the
// marks.
func (r *recorder) Trace() *order.Trace {
	r.mu.Lock()
	defer r.mu.Unlock()
	acc := make([]order.Access, 0, r.touched)
	for _, b := range r.trace {
		acc = append(acc, b...)
	}
	return &order.Trace{Accesses: acc, Marks: append([]order.Mark(nil), r.marks...)}
}
