package fs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// eventLog is a growing text file of events, one a line, that a reader can
// follow like `tail -f`. It keeps at least the newest limit bytes (maxLog
// unless set) and at most twice that, always whole lines. Offsets in it are
// absolute: they count every byte ever logged, dropped or not.
type eventLog struct {
	mu        sync.Mutex
	buf       []byte
	first     int64     // offset of buf[0]
	firstLine int64     // lines dropped, so the number of the line at buf[0]
	last      time.Time // when the newest line was added
	limit     int       // 0 means maxLog
}

const maxLog = 4 << 20

func (l *eventLog) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, line...)
	l.last = time.Now()
	limit := l.limit
	if limit == 0 {
		limit = maxLog
	}
	// Trimming only past twice the limit keeps the copy it costs to once
	// per limit bytes logged, rather than once per line.
	if len(l.buf) > 2*limit {
		over := len(l.buf) - limit
		// Drop whole lines from the front.
		for over < len(l.buf) && l.buf[over-1] != '\n' {
			over++
		}
		l.firstLine += int64(bytes.Count(l.buf[:over], []byte{'\n'}))
		l.first += int64(over)
		l.buf = append(l.buf[:0], l.buf[over:]...)
	}
}

// stat returns the stream's size (every byte logged) and when it last grew.
func (l *eventLog) stat() (int64, time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first + int64(len(l.buf)), l.last
}

// read fills p from stream offset pos, the start of line number line (-1 if
// the caller does not know it), and returns how many bytes it filled, and
// the offset and line number at which the caller continues. It returns
// whole lines only, unless a single line is longer than p. If pos has been
// dropped, p gets one marker line instead, "# N lines dropped", and the
// caller continues at the oldest line kept.
func (l *eventLog) read(p []byte, pos, line int64) (n int, next, nextLine int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if pos < l.first {
		marker := "# lines dropped\n"
		if line >= 0 {
			marker = fmt.Sprintf("# %d lines dropped\n", l.firstLine-line)
		}
		return copy(p, marker), l.first, l.firstLine
	}
	rel := pos - l.first
	if rel >= int64(len(l.buf)) {
		return 0, pos, line
	}
	if line < 0 {
		line = l.firstLine + int64(bytes.Count(l.buf[:rel], []byte{'\n'}))
	}
	n = copy(p, l.buf[rel:])
	if int(rel)+n < len(l.buf) {
		if i := bytes.LastIndexByte(p[:n], '\n'); i >= 0 {
			n = i + 1
		}
	}
	return n, pos + int64(n), line + int64(bytes.Count(p[:n], []byte{'\n'}))
}

// follower is one open of a stream file. A reader that keeps up reads the
// stream at its absolute offsets, as with any file. One that falls behind
// what the log keeps gets, where the dropped lines were, one line
// "# N lines dropped" and then the oldest line kept: never part of a line,
// never a line twice. Since the file offset moves by the marker's length
// and the stream's by what was dropped, from then on this open's file
// offsets are behind the stream's by the difference (shift); the size
// stat reports stays the stream's. A read at an offset other than where
// the last one ended (a seek) is taken as a stream offset plus shift.
type follower struct {
	log *eventLog

	mu    sync.Mutex
	shift int64 // stream offset minus file offset
	next  int64 // file offset at which the last read ended
	line  int64 // number of the line at next, -1 if unknown
}

var _ = (fusefs.FileReader)((*follower)(nil))

func (f *follower) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	line := f.line
	if off != f.next {
		line = -1
	}
	pos := off + f.shift
	n, next, nextLine := f.log.read(dest, pos, line)
	f.shift = next - (off + int64(n))
	f.next = off + int64(n)
	f.line = nextLine
	return fuse.ReadResultData(dest[:n]), 0
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

	accessed, fetched, modifiedLog, discardedLog, io eventLog
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

// discarded records a chunk of img discarded whole, in
// streams/chunks_discarded.
func (r *recorder) discarded(img overlay.Image, idx uint32) {
	r.discardedLog.add(fmt.Sprintf("%.6f %s %d\n", r.since(), img, idx))
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
