package overlay

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
)

// Overlay is an opened overlay: its header, manifest, state and vm.json,
// all verified, with the segments left in place to be read on demand.
type Overlay struct {
	Header   *Header
	Manifest *Manifest
	State    []byte
	VMConfig []byte // nil when the overlay carries none
	// ID is the sha256 of the header. The header holds the digests of the
	// manifest, state and vm.json, and the manifest those of every segment,
	// so ID names the whole overlay.
	ID Digest

	r      io.ReaderAt
	parent [2]io.ReaderAt // a layered overlay's parent images (SetParentImages)
}

// Open reads and verifies an overlay's metadata from r. size is the file's
// length, or -1 when unknown; when known, a truncated or overlong file is
// rejected at once.
func Open(r io.ReaderAt, size int64) (*Overlay, error) {
	hb := make([]byte, HeaderSize)
	if n, err := r.ReadAt(hb, 0); n < HeaderSize {
		if err == io.EOF || err == nil {
			return nil, fmt.Errorf("header: file is %d bytes, shorter than the %d-byte header: truncated or not an overlay", n, HeaderSize)
		}
		return nil, fmt.Errorf("header: %w", err)
	}
	h, err := UnmarshalHeader(hb)
	if err != nil {
		return nil, err
	}
	if size >= 0 && size != h.TotalLen() {
		if size < h.TotalLen() {
			return nil, fmt.Errorf("truncated: file is %d bytes, header says %d", size, h.TotalLen())
		}
		return nil, fmt.Errorf("file is %d bytes, header says %d: trailing data", size, h.TotalLen())
	}
	o := &Overlay{Header: h, ID: sha256.Sum256(hb), r: r}

	mr, err := o.blobReader("manifest", h.manifestOff(), h.Manifest)
	if err != nil {
		return nil, err
	}
	m, err := DecodeManifest(mr, h, h.SegmentsOff())
	if err != nil {
		if !errors.Is(err, errManifest) {
			err = fmt.Errorf("manifest: %w", err)
		}
		return nil, err
	}
	o.Manifest = m
	if o.State, err = o.readBlob("state", h.stateOff(), h.State); err != nil {
		return nil, err
	}
	if h.HasVMConfig {
		if o.VMConfig, err = o.readBlob("vm.json", h.vmconfigOff(), h.VMConfig); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// blobReader verifies a metadata blob's stored bytes and returns a reader
// over its decompressed content, limited to the size the header declares.
func (o *Overlay) blobReader(part string, off int64, b Blob) (io.Reader, error) {
	stored := make([]byte, b.Stored)
	if n, err := o.r.ReadAt(stored, off); n < len(stored) {
		if err == io.EOF || err == nil {
			return nil, fmt.Errorf("%s: truncated: got %d of %d bytes", part, n, len(stored))
		}
		return nil, fmt.Errorf("%s: %w", part, err)
	}
	if got := Digest(sha256.Sum256(stored)); got != b.SHA {
		return nil, fmt.Errorf("%s: sha256 mismatch (got %s, want %s): the overlay is corrupt", part, got.Short(), b.SHA.Short())
	}
	dr, err := decompressStream(o.Header.MetaCodec, bytes.NewReader(stored))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", part, err)
	}
	return &exactReader{r: io.LimitReader(dr, int64(b.Raw)+1), left: int64(b.Raw), part: part}, nil
}

func (o *Overlay) readBlob(part string, off int64, b Blob) ([]byte, error) {
	r, err := o.blobReader(part, off, b)
	if err != nil {
		return nil, err
	}
	out, err := readExactly(r, int(b.Raw))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", part, err)
	}
	return out, nil
}

// exactReader fails if the stream is longer or shorter than declared.
type exactReader struct {
	r    io.Reader
	left int64
	part string
}

func (e *exactReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if e.left < 0 {
		return n, fmt.Errorf("%s decodes to more bytes than the header declares", e.part)
	}
	if err == io.EOF && e.left > 0 {
		return n, fmt.Errorf("%s decodes to %d bytes fewer than the header declares", e.part, e.left)
	}
	return n, err
}

// ReadSegmentStored reads segment i's stored bytes from the overlay.
func (o *Overlay) ReadSegmentStored(i int) ([]byte, error) {
	s := o.Manifest.Segments[i]
	buf := make([]byte, s.Stored)
	if n, err := o.r.ReadAt(buf, s.Offset); n < len(buf) {
		if err == io.EOF || err == nil {
			return nil, fmt.Errorf("segment %d: truncated: got %d of %d bytes", i, n, len(buf))
		}
		return nil, fmt.Errorf("segment %d: %w", i, err)
	}
	return buf, nil
}

// ReadSegment reads, verifies and decodes segment i.
func (o *Overlay) ReadSegment(i int) ([]byte, error) {
	stored, err := o.ReadSegmentStored(i)
	if err != nil {
		return nil, err
	}
	return DecodeSegment(i, o.Manifest.Segments[i], stored)
}

// DecodeSegment checks a segment's stored bytes against its sha256 and
// decodes them. The digest is checked first, so a corrupt or hostile segment
// never reaches the decompressor.
func DecodeSegment(i int, s Segment, stored []byte) ([]byte, error) {
	if len(stored) != int(s.Stored) {
		return nil, fmt.Errorf("segment %d: got %d bytes, want %d: the overlay is truncated", i, len(stored), s.Stored)
	}
	if got := Digest(sha256.Sum256(stored)); got != s.SHA {
		return nil, fmt.Errorf("segment %d: sha256 mismatch (got %s, want %s): the overlay is corrupt or truncated", i, got.Short(), s.SHA.Short())
	}
	raw, err := decompress(s.Codec, stored, int(s.Raw))
	if err != nil {
		return nil, fmt.Errorf("segment %d: %v", i, err)
	}
	return raw, nil
}

// Verify reads and decodes every segment on workers goroutines, checking
// each digest. The metadata was already verified by Open. progress, if set,
// is told the raw bytes of each segment verified.
func (o *Overlay) Verify(workers int, progress func(n, total int64)) error {
	prog := lockedProgress(progress, o.rawTotal())
	return o.eachSegment(workers, func(i int) error {
		if _, err := o.ReadSegment(i); err != nil {
			return err
		}
		if prog != nil {
			prog(int64(o.Manifest.Segments[i].Raw))
		}
		return nil
	})
}

func (o *Overlay) rawTotal() int64 {
	var total int64
	for _, s := range o.Manifest.Segments {
		total += int64(s.Raw)
	}
	return total
}

// lockedProgress adapts a progress callback for use from many goroutines.
func lockedProgress(progress func(n, total int64), total int64) func(int64) {
	if progress == nil {
		return nil
	}
	var mu sync.Mutex
	return func(n int64) {
		mu.Lock()
		defer mu.Unlock()
		progress(n, total)
	}
}

// eachSegment runs fn for every segment index on workers goroutines (0 means
// all cores) and returns the first error, after which no new segment starts.
func (o *Overlay) eachSegment(workers int, fn func(i int) error) error {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	jobs := make(chan int)
	stop := make(chan struct{})
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				if err := fn(i); err != nil {
					once.Do(func() { first = err; close(stop) })
					return
				}
			}
		}()
	}
feed:
	for i := range o.Manifest.Segments {
		select {
		case jobs <- i:
		case <-stop:
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	return first
}

// Counts returns the number of chunks of each kind, per image.
func (m *Manifest) Counts() [2][numKinds]int {
	var c [2][numKinds]int
	for _, img := range Images {
		for _, r := range m.Refs[img] {
			c[img][r.Kind]++
		}
	}
	return c
}
