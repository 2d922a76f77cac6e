package overlay

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"sync"
)

// Input is the custom VM an overlay is built from.
type Input struct {
	Images   [2]io.ReaderAt // by Image
	Sizes    [2]int64
	State    []byte
	VMConfig []byte // nil when there is none
}

// BuildOptions tune Build. The zero value gives the defaults.
type BuildOptions struct {
	SegmentSize int   // uncompressed bytes per segment, rounded to whole chunks; default 1 MiB
	Codec       Codec // segment codec; zero value CodecNone, so callers set it
	Workers     int   // goroutines for hashing and compression; 0 means all cores
	// Order lists chunks in the order they should stream, usually the first
	// accesses of a trace. Chunks it names come first; the rest follow,
	// memory then disk, each by offset.
	Order []ChunkID
	// Progress, if set, is told how many input bytes each step finished.
	// phase is "hash" or "compress"; total is that phase's size.
	Progress func(phase string, n, total int64)
	// Context, if set, interrupts the build when done: it fails with the
	// context's error and leaves nothing behind.
	Context context.Context
	// Parent, if set, makes a layered overlay on that parent: chunks the
	// parent's VM has (at the same offset first, then anywhere) become
	// parent references, and only the rest travel.
	Parent *ParentHashes
}

// Summary describes a built overlay.
type Summary struct {
	Counts [2][numKinds]int
	// ChangedCounts counts, by where their bytes come from, only the chunks
	// that differ from the base at the same offset: what dedup and zero
	// detection take out of the changed state.
	ChangedCounts [2][numKinds]int
	DataBytes     int64 // uncompressed bytes in segments
	ChangedBytes  int64 // bytes of chunks that differ from the base at the same offset
	OverlaySize   int64
	Segments      int
	ID            Digest
}

// Build writes the overlay of in against base to the file out. It writes to a
// temporary file beside out and renames it into place only when complete, so
// a failure leaves nothing behind. It creates the directories above out
// that are missing, and removes them again on failure.
func Build(out string, base *Base, in *Input, opt BuildOptions) (*Summary, error) {
	sum, err := buildOverlay(out, base, in, opt)
	return sum, hideTemp(err)
}

func buildOverlay(out string, base *Base, in *Input, opt BuildOptions) (*Summary, error) {
	if opt.Context == nil {
		opt.Context = context.Background()
	}
	in = &Input{Images: in.Images, Sizes: in.Sizes, State: in.State, VMConfig: in.VMConfig}
	for _, img := range Images {
		in.Images[img] = ctxReaderAt{opt.Context, in.Images[img]}
	}
	if opt.SegmentSize <= 0 {
		opt.SegmentSize = DefaultSegment
	}
	if opt.SegmentSize > MaxSegmentRaw {
		return nil, fmt.Errorf("segment size %d exceeds the limit of %d", opt.SegmentSize, MaxSegmentRaw)
	}
	if opt.Workers <= 0 {
		opt.Workers = runtime.GOMAXPROCS(0)
	}
	cs := base.Index.ChunkSize
	for _, img := range Images {
		if in.Sizes[img] > MaxImageSize {
			return nil, fmt.Errorf("%s image is %d bytes, more than the limit of %d", img, in.Sizes[img], int64(MaxImageSize))
		}
	}
	if len(in.State) > MaxStateSize {
		return nil, fmt.Errorf("state is %d bytes, more than the limit of %d", len(in.State), MaxStateSize)
	}
	if len(in.VMConfig) > MaxVMConfigSize {
		return nil, fmt.Errorf("vm.json is %d bytes, more than the limit of %d", len(in.VMConfig), MaxVMConfigSize)
	}
	version := uint16(Version)
	if opt.Parent != nil {
		version = LayeredVersion
		if l := len(opt.Parent.Parent.Location); l == 0 || l > MaxParentLocation {
			return nil, fmt.Errorf("parent location of %d bytes: want 1 to %d", l, MaxParentLocation)
		}
	}
	h := &Header{
		Version:     version,
		ChunkSize:   uint32(cs),
		DiskSize:    uint64(in.Sizes[Disk]),
		MemorySize:  uint64(in.Sizes[Memory]),
		BaseID:      base.ID,
		MetaCodec:   opt.Codec,
		HasVMConfig: in.VMConfig != nil,
	}
	for _, c := range opt.Order {
		if int(c.Index) >= h.Chunks(c.Image) {
			return nil, fmt.Errorf("order names %s, beyond the image's %d chunks", c, h.Chunks(c.Image))
		}
	}

	// Hash every chunk of the custom images.
	var hashes [2][]Digest
	hashTotal := in.Sizes[Disk] + in.Sizes[Memory]
	for _, img := range Images {
		var prog func(int64)
		if opt.Progress != nil {
			prog = func(n int64) { opt.Progress("hash", n, hashTotal) }
		}
		hs, err := hashChunks(in.Images[img], in.Sizes[img], cs, opt.Workers, nil, prog)
		if err != nil {
			return nil, fmt.Errorf("%s image: %w", img, err)
		}
		hashes[img] = hs
	}

	// Pick the cheapest reference for each chunk. Chunks that no base and no
	// zero can supply are placeholders until the order decides which copy
	// carries the data.
	sum := &Summary{}
	zero := zeroDigest(cs)
	m := &Manifest{}
	var parentHashes [2][]Digest
	parentAt := map[Digest]Ref{}
	if p := opt.Parent; p != nil {
		m.Parent = &Parent{ID: p.Parent.ID, Location: p.Parent.Location}
		parentHashes = p.Hashes
		for _, img := range []Image{Disk, Memory} {
			for i := len(p.Hashes[img]) - 1; i >= 0; i-- {
				parentAt[p.Hashes[img][i]] = Ref{Kind: ParentDisk + Kind(img), Index: uint32(i)}
			}
		}
	}
	var pending, changed [2][]bool
	for _, img := range Images {
		hs := hashes[img]
		bh := base.Index.Hashes[img]
		ph := parentHashes[img]
		refs := make([]Ref, len(hs))
		pending[img] = make([]bool, len(hs))
		changed[img] = make([]bool, len(hs))
		for i, d := range hs {
			same := i < len(bh) && bh[i] == d || i >= len(bh) && d == zero
			if !same {
				sum.ChangedBytes += chunkLen(h, ChunkID{img, uint32(i)})
				changed[img][i] = true
			}
			switch {
			case d == zero:
				refs[i] = Ref{Kind: Zero}
			case i < len(bh) && bh[i] == d:
				refs[i] = baseRef(img, i)
			case i < len(ph) && ph[i] == d:
				refs[i] = Ref{Kind: ParentDisk + Kind(img), Index: uint32(i)}
			default:
				if r, ok := base.Lookup(d); ok {
					refs[i] = r
				} else if r, ok := parentAt[d]; ok {
					refs[i] = r
				} else {
					pending[img][i] = true
				}
			}
		}
		m.Refs[img] = refs
	}

	// Stream order: the given order first, then memory, then disk. The first
	// copy of each content in that order is data; later copies refer to it,
	// so a self reference never waits on a later segment.
	first := make(map[Digest]ChunkID)
	place := func(c ChunkID) {
		if !pending[c.Image][c.Index] {
			return
		}
		pending[c.Image][c.Index] = false
		d := hashes[c.Image][c.Index]
		if t, ok := first[d]; ok {
			m.Refs[c.Image][c.Index] = Ref{Kind: Self, Image: t.Image, Index: t.Index}
			return
		}
		first[d] = c
		m.Refs[c.Image][c.Index] = Ref{Kind: Data, Index: uint32(len(m.Order))}
		m.Order = append(m.Order, c)
	}
	for _, c := range opt.Order {
		place(c)
	}
	for _, img := range []Image{Memory, Disk} {
		for i := range pending[img] {
			place(ChunkID{img, uint32(i)})
		}
	}

	// Cut the data chunks into segments of about SegmentSize bytes.
	segSize := max(cs, opt.SegmentSize/cs*cs)
	for pos := 0; pos < len(m.Order); {
		s := Segment{Codec: opt.Codec, First: pos}
		var raw int64
		for pos < len(m.Order) && (s.Count == 0 || raw+chunkLen(h, m.Order[pos]) <= int64(segSize)) {
			raw += chunkLen(h, m.Order[pos])
			s.Count++
			pos++
		}
		s.Raw = uint32(raw)
		sum.DataBytes += raw
		m.Segments = append(m.Segments, s)
	}

	undo, err := mkdirs(filepath.Dir(out))
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			undo()
		}
	}()
	f, err := tempFile(out)
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			discard(f)
		}
	}()

	// Segments go to a second temporary file: their sizes and digests belong
	// in the manifest, which the overlay carries before them.
	segs, err := tempFile(out + segmentsSuffix)
	if err != nil {
		return nil, err
	}
	defer discard(segs)
	if err := writeSegments(segs, h, m, in, hashes, opt); err != nil {
		return nil, err
	}
	for _, s := range m.Segments {
		h.SegmentsLen += uint64(s.Stored)
	}

	var meta [3][]byte
	blobs := [3]*Blob{&h.Manifest, &h.State, &h.VMConfig}
	for i, raw := range [][]byte{m.Encode(), in.State, in.VMConfig} {
		if i == 2 && in.VMConfig == nil {
			break
		}
		c, err := compress(opt.Codec, raw)
		if err != nil {
			return nil, err
		}
		meta[i] = c
		*blobs[i] = Blob{Stored: uint64(len(c)), Raw: uint64(len(raw)), SHA: sha256.Sum256(c)}
	}
	hb := h.Marshal()
	for _, p := range [][]byte{hb, meta[0], meta[1], meta[2]} {
		if _, err := f.Write(p); err != nil {
			return nil, err
		}
	}
	if _, err := segs.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	if _, err := io.Copy(f, segs); err != nil {
		return nil, err
	}
	if err := commit(f, out); err != nil {
		return nil, err
	}
	committed, ok = true, true
	if err := syncDir(filepath.Dir(out)); err != nil {
		return nil, err
	}

	sum.Counts = m.Counts()
	for _, img := range Images {
		for i, r := range m.Refs[img] {
			if changed[img][i] {
				sum.ChangedCounts[img][r.Kind]++
			}
		}
	}
	sum.OverlaySize = h.TotalLen()
	sum.Segments = len(m.Segments)
	sum.ID = sha256.Sum256(hb)
	return sum, nil
}

// writeSegments compresses the segments on opt.Workers goroutines and writes
// them to w in order, keeping at most two segments per worker in memory. It
// fills in each segment's stored size, digest and offset.
func writeSegments(w io.Writer, h *Header, m *Manifest, in *Input, hashes [2][]Digest, opt BuildOptions) error {
	ctx, cancel := context.WithCancel(context.Background())
	type result struct {
		stored []byte
		err    error
	}
	results := make([]chan result, len(m.Segments))
	for i := range results {
		results[i] = make(chan result, 1)
	}
	slots := make(chan struct{}, 2*opt.Workers)
	jobs := make(chan int)
	go func() {
		defer close(jobs)
		for i := range m.Segments {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			select {
			case jobs <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	var total int64
	for _, s := range m.Segments {
		total += int64(s.Raw)
	}
	var wg sync.WaitGroup
	for range opt.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				stored, err := encodeSegment(h, m, i, in, hashes)
				results[i] <- result{stored, err}
			}
		}()
	}
	// On an early return, stop the producer before waiting for the workers
	// it feeds.
	defer func() {
		cancel()
		wg.Wait()
	}()

	off := h.SegmentsOff()
	for i := range m.Segments {
		r := <-results[i]
		<-slots
		if r.err != nil {
			return r.err
		}
		s := &m.Segments[i]
		s.Stored = uint32(len(r.stored))
		s.SHA = sha256.Sum256(r.stored)
		s.Offset = off
		off += int64(s.Stored)
		if _, err := w.Write(r.stored); err != nil {
			return err
		}
		if opt.Progress != nil {
			opt.Progress("compress", int64(s.Raw), total)
		}
	}
	return nil
}

// errChanged reports an input that no longer matches its hash pass.
var errChanged = errors.New("changed while the overlay was being built")

// encodeSegment gathers a segment's chunks from the input, checks each
// against the digest taken in the hash pass, and compresses them.
func encodeSegment(h *Header, m *Manifest, i int, in *Input, hashes [2][]Digest) ([]byte, error) {
	s := m.Segments[i]
	raw := make([]byte, s.Raw)
	pad := make([]byte, h.ChunkSize)
	off := 0
	for _, c := range m.Order[s.First : s.First+s.Count] {
		n := int(chunkLen(h, c))
		buf := raw[off : off+n]
		if k, err := in.Images[c.Image].ReadAt(buf, int64(c.Index)*int64(h.ChunkSize)); k < n {
			if err == nil || err == io.EOF {
				err = errChanged
			}
			return nil, fmt.Errorf("%s image: %w", c.Image, err)
		}
		copy(pad, buf)
		clear(pad[n:])
		if sha256.Sum256(pad) != hashes[c.Image][c.Index] {
			return nil, fmt.Errorf("%s image: %s %w", c.Image, c, errChanged)
		}
		off += n
	}
	stored, err := compress(s.Codec, raw)
	if err != nil {
		return nil, fmt.Errorf("segment %d: %w", i, err)
	}
	return stored, nil
}
