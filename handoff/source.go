package handoff

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
)

// Options say what to hand off and where the layer goes.
type Options struct {
	VM      *qemu.VM
	Session *session.Session // the VM's mount
	// Dir is a directory of the handoff's own: the guest's memory as it
	// arrives, the segments sent ahead, and the layer.
	Dir string
	// Push sends one compressed segment ahead to the destination, which
	// keeps it by the sha256 of its bytes. An error fails the handoff.
	Push func(ctx context.Context, sha overlay.Digest, stored []byte) error
	// ParentLocation is where the destination fetches the VM's overlay,
	// the layer's parent.
	ParentLocation string
	// SegmentSize is the raw bytes of each segment; default 64 KiB. A
	// segment sent ahead is of use only if none of its chunks changes
	// again before the VM stops: small ones lose less to the guest's hot
	// pages.
	SegmentSize int
	// Pushes is how many segments are sent at once, to keep a link with
	// a long round trip busy; default 4.
	Pushes int
	// DowntimeLimit is QEMU's: it stops the VM once what is left to send
	// would take no longer than this at the rate it measures. Default
	// 300 ms, QEMU's own.
	DowntimeLimit time.Duration
	// MaxPrecopy bounds the rounds: after it QEMU is told to stop the VM
	// whatever is left. Default 2 minutes.
	MaxPrecopy time.Duration
	Events     func(Event)
	Log        zerolog.Logger
}

// Event is a step of a handoff's timeline.
type Event struct {
	At    float64 `json:"at_s"` // seconds since the handoff began
	Step  string  `json:"step"`
	Round int     `json:"round,omitempty"`
	Bytes int64   `json:"bytes,omitempty"`
	Text  string  `json:"text"`
}

// Steps of a handoff's timeline.
const (
	StepPrecopy = "precopy" // QEMU's migration stream began; the VM runs on
	StepRound   = "round"   // a round of QEMU's precopy ended: what it sent ahead
	StepCodec   = "codec"   // the segment codec changed
	StepStopped = "stopped" // QEMU stopped the VM: the downtime begins
	StepLayer   = "layer"   // the last layer is written; the destination may resume
)

// Result is a handoff's outcome on the source.
type Result struct {
	Layer         string         // the layer file
	ID            overlay.Digest // its overlay ID
	Stopped       time.Time      // when QEMU stopped the VM
	Rounds        int            // QEMU's dirty-page rounds
	PushedBytes   int64          // stored bytes sent ahead
	PushedUsed    int64          // of them, what the layer uses
	LayerBytes    int64          // the layer file's size
	MetadataBytes int64          // the layer's metadata: what the destination needs to resume
	FinalBytes    int64          // segment bytes left for the destination to fetch
}

// Send hands off the VM: it runs QEMU's precopy migration into a reader
// that keeps what differs from the VM's overlay and pushes it ahead, and
// once QEMU has stopped the VM and sent its device state, writes the
// layer. The VM is then stopped (QEMU's postmigrate state): the caller
// quits it once the destination runs, or calls Abort.
func Send(ctx context.Context, opt Options) (*Result, error) {
	h := &sender{opt: opt, start: time.Now(), codec: newChooser(), inBuf: map[overlay.ChunkID]int{}}
	if h.opt.SegmentSize <= 0 {
		h.opt.SegmentSize = 64 << 10
	}
	if h.opt.Pushes <= 0 {
		h.opt.Pushes = 4
	}
	if h.opt.DowntimeLimit <= 0 {
		h.opt.DowntimeLimit = 300 * time.Millisecond
	}
	if h.opt.MaxPrecopy <= 0 {
		h.opt.MaxPrecopy = 2 * time.Minute
	}
	return h.run(ctx)
}

// Abort undoes a handoff that did not complete: it cancels the migration
// if it still runs, and lets the VM run again if QEMU stopped it.
func Abort(ctx context.Context, vm *qemu.VM) error {
	st, _, err := vm.QMP.MigrationStatus(ctx)
	if err != nil {
		return err
	}
	if st == "active" || st == "setup" || st == "pre-switchover" || st == "device" {
		if _, err := vm.QMP.Execute(ctx, "migrate_cancel", nil); err != nil {
			return err
		}
		for range 500 {
			if st, _, err = vm.QMP.MigrationStatus(ctx); err != nil || st != "cancelling" && st != "active" && st != "device" {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	run, err := vm.QMP.Status(ctx)
	if err != nil {
		return err
	}
	if run != "running" {
		if _, err := vm.QMP.Execute(ctx, "cont", nil); err != nil {
			return fmt.Errorf("letting the VM run again: %w", err)
		}
	}
	return nil
}

type sender struct {
	opt   Options
	start time.Time
	codec *chooser

	o     *overlay.Overlay
	base  *overlay.Base
	cs    int64
	zero  overlay.Digest
	orig  [2][]overlay.Digest // the overlay's own chunks, by digest
	have  [2][]overlay.Digest // what the destination will have
	where [2][]int32          // the pushed segment holding each chunk, -1 if none

	mem      *os.File
	segFile  *os.File
	segs     []pushed
	buf      []overlay.ChunkID
	bufRaw   []byte
	inBuf    map[overlay.ChunkID]int // offset in bufRaw of each chunk in buf
	stopped  bool
	stopAt   time.Time
	lastDisk time.Time

	pushQ   chan pushed
	pushErr chan error
	pushWG  sync.WaitGroup
	mu      sync.Mutex
	pushedB int64
	round   int
	roundB  int64

	inFlight  int
	busySince time.Time
	busy      time.Duration
	busyBytes int64
}

// pushed is a segment sent ahead.
type pushed struct {
	chunks []overlay.ChunkID
	raw    int
	enc    *overlay.Encoder
	off    int64 // in segFile
	n      int   // stored bytes
	stored []byte
	sha    overlay.Digest
}

func (h *sender) event(step string, round int, n int64, text string) {
	h.opt.Log.Info().Str("step", step).Int("round", round).Int64("bytes", n).Msg(text)
	if h.opt.Events != nil {
		h.opt.Events(Event{At: time.Since(h.start).Seconds(), Step: step, Round: round, Bytes: n, Text: text})
	}
}

func (h *sender) run(ctx context.Context) (res *Result, err error) {
	s := h.opt.Session
	h.o = s.Overlay
	h.base = s.Fetcher.Base()
	h.cs = int64(h.o.Header.ChunkSize)
	if h.cs != pageSize {
		return nil, fmt.Errorf("handoff needs an overlay of %d-byte chunks, the guest's page size; this one has %d", pageSize, h.cs)
	}
	h.zero = sha256.Sum256(make([]byte, h.cs))
	if err := os.MkdirAll(h.opt.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := h.hashOriginal(ctx); err != nil {
		return nil, err
	}
	for _, img := range overlay.Images {
		h.have[img] = append([]overlay.Digest(nil), h.orig[img]...)
		h.where[img] = make([]int32, len(h.orig[img]))
		for i := range h.where[img] {
			h.where[img][i] = -1
		}
	}
	// The guest's memory as it arrives, and the segments sent ahead:
	// the layer is made of them, and then they go.
	memPath, segPath := filepath.Join(h.opt.Dir, "memory"), filepath.Join(h.opt.Dir, "segments")
	defer os.Remove(memPath)
	defer os.Remove(segPath)
	if h.mem, err = os.OpenFile(memPath, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600); err != nil {
		return nil, err
	}
	defer h.mem.Close()
	if err := h.mem.Truncate(h.o.Header.ImageSize(overlay.Memory)); err != nil {
		return nil, err
	}
	if h.segFile, err = os.OpenFile(segPath, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600); err != nil {
		return nil, err
	}
	defer h.segFile.Close()

	// A directory of its own in /tmp: a socket's path must fit 108 bytes.
	sockDir, err := os.MkdirTemp("", "cloudletfs-migrate-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "migrate.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	q := h.opt.VM.QMP
	if _, err := q.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}); err != nil {
		return nil, err
	}
	if _, err := q.Execute(ctx, "migrate-set-parameters", map[string]any{
		"downtime-limit": h.opt.DowntimeLimit.Milliseconds(), "max-bandwidth": int64(1) << 34,
	}); err != nil {
		return nil, err
	}
	if _, err := q.Execute(ctx, "migrate", map[string]any{"uri": "unix:" + sock}); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			actx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if aerr := Abort(actx, h.opt.VM); aerr != nil {
				h.opt.Log.Error().Err(aerr).Msg("handoff: letting the VM run again")
			}
			cancel()
		}
	}()
	conn, err := acceptCtx(ctx, ln)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	h.event(StepPrecopy, 0, 0, "QEMU's precopy began; the VM runs on while what it changed goes ahead")

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	h.pushQ = make(chan pushed)
	h.pushErr = make(chan error, 1)
	for range h.opt.Pushes {
		h.pushWG.Add(1)
		go h.pusher(rctx)
	}
	rounds := make(chan struct{})
	go func() { defer close(rounds); h.watchRounds(rctx) }()

	st := &Stream{Page: h.page, Stopped: h.stop, MemorySize: h.o.Header.ImageSize(overlay.Memory)}
	go func() {
		<-rctx.Done()
		conn.Close() // unblocks the reader
	}()
	readErr := st.Read(conn)
	close(h.pushQ)
	h.pushWG.Wait()
	var perr error
	select {
	case perr = <-h.pushErr:
	default:
	}
	cancel()
	<-rounds
	if perr != nil {
		return nil, fmt.Errorf("sending ahead: %w", perr)
	}
	if readErr != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, readErr
	}
	if err := h.opt.VM.WaitMigration(ctx, "handoff"); err != nil {
		return nil, err
	}
	// QEMU flushed the disk when it stopped the VM.
	if err := h.scanDisk(ctx); err != nil {
		return nil, err
	}
	res, err = h.writeLayer(st.State())
	if err != nil {
		return nil, err
	}
	ok = true
	return res, nil
}

func acceptCtx(ctx context.Context, ln net.Listener) (net.Conn, error) {
	type r struct {
		c   net.Conn
		err error
	}
	ch := make(chan r, 1)
	go func() { c, err := ln.Accept(); ch <- r{c, err} }()
	select {
	case x := <-ch:
		return x.c, x.err
	case <-ctx.Done():
		ln.Close()
		return nil, ctx.Err()
	case <-time.After(30 * time.Second):
		ln.Close()
		return nil, errors.New("QEMU never connected its migration stream")
	}
}

// hashOriginal hashes every chunk of the overlay's own images, as the
// destination will have them from the overlay.
func (h *sender) hashOriginal(ctx context.Context) error {
	f := h.opt.Session.Fetcher
	buf := make([]byte, 1<<20)
	for _, img := range overlay.Images {
		size := h.o.Header.ImageSize(img)
		n := h.o.Header.Chunks(img)
		ds := make([]overlay.Digest, n)
		for off := int64(0); off < size; off += int64(len(buf)) {
			b := buf[:min(int64(len(buf)), size-off)]
			if err := f.ReadOriginal(ctx, img, b, off); err != nil {
				return fmt.Errorf("reading the overlay's %s: %w", img, err)
			}
			for p := int64(0); p < int64(len(b)); p += h.cs {
				ds[(off+p)/h.cs] = h.digest(b[p:min(p+h.cs, int64(len(b)))])
			}
		}
		h.orig[img] = ds
	}
	return nil
}

// digest hashes a chunk as the overlay format does: a short last chunk as
// if padded with zeros.
func (h *sender) digest(b []byte) overlay.Digest {
	if int64(len(b)) == h.cs {
		return sha256.Sum256(b)
	}
	p := make([]byte, h.cs)
	copy(p, b)
	return sha256.Sum256(p)
}

// page takes one page of guest memory from the stream.
func (h *sender) page(off int64, data []byte) error {
	select {
	case err := <-h.pushErr:
		// A push failed: stop now, not at the next segment.
		h.pushErr <- err
		return err
	default:
	}
	var d overlay.Digest
	if data == nil {
		d = h.zero
		// The file starts sparse: zeros need writing only over a page
		// that was not.
		if h.have[overlay.Memory][off/h.cs] != h.zero {
			if _, err := h.mem.WriteAt(zeroPage[:], off); err != nil {
				return err
			}
		}
	} else {
		d = sha256.Sum256(data)
		if _, err := h.mem.WriteAt(data, off); err != nil {
			return err
		}
	}
	id := overlay.ChunkID{Image: overlay.Memory, Index: uint32(off / h.cs)}
	if err := h.changed(id, d, data); err != nil {
		return err
	}
	if !h.stopped && time.Since(h.lastDisk) > time.Second {
		h.lastDisk = time.Now()
		return h.scanDisk(context.Background())
	}
	return nil
}

var zeroPage [pageSize]byte

// changed records a chunk's new content: sent ahead while the VM runs,
// left for the layer's own segments once it stopped.
func (h *sender) changed(id overlay.ChunkID, d overlay.Digest, data []byte) error {
	if h.have[id.Image][id.Index] == d {
		return nil
	}
	h.have[id.Image][id.Index] = d
	h.where[id.Image][id.Index] = -1
	_, inBase := h.base.Lookup(d)
	if h.stopped || d == h.orig[id.Image][id.Index] || d == h.zero || inBase {
		// The layer refers to it, or carries it in its own segments:
		// a copy gathered to go ahead is out of date.
		h.unbuffer(id)
		return nil
	}
	if at, ok := h.inBuf[id]; ok {
		// Changed again before its segment was sealed: one copy, the
		// last.
		copy(h.bufRaw[at:at+len(data)], data)
		return nil
	}
	h.inBuf[id] = len(h.bufRaw)
	h.buf = append(h.buf, id)
	h.bufRaw = append(h.bufRaw, data...)
	if len(h.bufRaw) >= h.opt.SegmentSize {
		return h.seal()
	}
	return nil
}

// unbuffer drops a chunk from the segment being gathered.
func (h *sender) unbuffer(id overlay.ChunkID) {
	if _, ok := h.inBuf[id]; !ok {
		return
	}
	buf, raw := h.buf, h.bufRaw
	h.buf, h.bufRaw = nil, nil
	clear(h.inBuf)
	for _, c := range buf {
		at, n := h.inBufAt(raw, buf, c)
		if c == id {
			continue
		}
		h.inBuf[c] = len(h.bufRaw)
		h.buf = append(h.buf, c)
		h.bufRaw = append(h.bufRaw, raw[at:at+n]...)
	}
}

// inBufAt returns where chunk c's bytes are in raw, gathered in buf's
// order.
func (h *sender) inBufAt(raw []byte, buf []overlay.ChunkID, c overlay.ChunkID) (int, int) {
	at := 0
	for _, b := range buf {
		n := int(h.o.Header.ChunkLen(b))
		if b == c {
			return at, n
		}
		at += n
	}
	return len(raw), 0
}

// seal compresses the chunks gathered and hands them to a pusher,
// waiting for one to be free: a slow link holds the reader back, and so
// QEMU.
func (h *sender) seal() error {
	if len(h.buf) == 0 {
		return nil
	}
	stored, enc, changed, err := h.codec.encode(h.bufRaw)
	if err != nil {
		return err
	}
	if changed {
		h.mu.Lock()
		round := h.round
		h.mu.Unlock()
		h.event(StepCodec, round, 0, fmt.Sprintf("segments now %s: link %s/s, %s", enc.Name, rate(h.codec.rate()), h.codec.describe()))
	}
	p := pushed{chunks: h.buf, raw: len(h.bufRaw), enc: enc, stored: stored, sha: sha256.Sum256(stored)}
	st, err := h.segFile.Stat()
	if err != nil {
		return err
	}
	p.off = st.Size()
	if _, err := h.segFile.WriteAt(stored, p.off); err != nil {
		return err
	}
	seg := int32(len(h.segs))
	for _, c := range p.chunks {
		h.where[c.Image][c.Index] = seg
	}
	h.segs = append(h.segs, pushed{chunks: p.chunks, raw: p.raw, enc: enc, off: p.off, n: len(stored), sha: p.sha})
	h.buf, h.bufRaw = nil, nil
	clear(h.inBuf)
	select {
	case h.pushQ <- p:
		return nil
	case err := <-h.pushErr:
		h.pushErr <- err
		return err
	}
}

func (h *sender) pusher(ctx context.Context) {
	defer h.pushWG.Done()
	for p := range h.pushQ {
		h.mu.Lock()
		if h.inFlight == 0 {
			h.busySince = time.Now()
		}
		h.inFlight++
		h.mu.Unlock()
		if err := h.opt.Push(ctx, p.sha, p.stored); err != nil {
			select {
			case h.pushErr <- err:
			default:
			}
			for range h.pushQ {
			}
			return
		}
		h.mu.Lock()
		h.pushedB += int64(len(p.stored))
		h.roundB += int64(len(p.stored))
		// The link's rate: bytes over the time pushes were under way,
		// all of them together.
		h.busyBytes += int64(len(p.stored))
		if h.inFlight--; h.inFlight == 0 {
			h.busy += time.Since(h.busySince)
		}
		busy := h.busy
		if h.inFlight > 0 {
			busy += time.Since(h.busySince)
		}
		h.codec.measured(h.busyBytes, busy)
		h.mu.Unlock()
	}
}

// watchRounds follows QEMU's rounds of dirty pages, and bounds them.
func (h *sender) watchRounds(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	forced := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		raw, err := h.opt.VM.QMP.Execute(ctx, "query-migrate", nil)
		if err != nil {
			continue
		}
		var q struct {
			Status string `json:"status"`
			RAM    struct {
				Syncs int `json:"dirty-sync-count"`
			} `json:"ram"`
		}
		json.Unmarshal(raw, &q)
		h.mu.Lock()
		for h.round < q.RAM.Syncs-1 {
			h.round++
			n := h.roundB
			h.roundB = 0
			h.mu.Unlock()
			h.event(StepRound, h.round, n, fmt.Sprintf("round %d sent %s ahead", h.round, bytesOf(n)))
			h.mu.Lock()
		}
		h.mu.Unlock()
		if !forced && time.Since(h.start) > h.opt.MaxPrecopy && q.Status == "active" {
			forced = true
			h.opt.VM.QMP.Execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": 60000})
			h.opt.Log.Warn().Msg("handoff: the rounds did not converge in time; stopping the VM with what is left")
		}
	}
}

// stop marks the end of the rounds: QEMU has stopped the VM.
func (h *sender) stop() {
	h.stopAt = time.Now()
	h.stopped = true
	// What was gathered but not pushed goes with the layer.
	h.buf, h.bufRaw = nil, nil
	clear(h.inBuf)
	h.mu.Lock()
	n, round := h.roundB, h.round
	h.mu.Unlock()
	h.event(StepStopped, round+1, n, "QEMU stopped the VM and sends the last round and the device state")
}

// scanDisk takes the disk chunks written through the mount that changed
// since the last scan.
func (h *sender) scanDisk(ctx context.Context) error {
	s := h.opt.Session
	ids, err := s.Cache.CowChunks()
	if err != nil {
		return err
	}
	zeros, err := s.Cache.DiscardedChunks()
	if err != nil {
		return err
	}
	ids = append(ids, zeros...)
	sort.Slice(ids, func(i, j int) bool {
		return ids[i].Image < ids[j].Image || ids[i].Image == ids[j].Image && ids[i].Index < ids[j].Index
	})
	buf := make([]byte, h.cs)
	for _, id := range ids {
		if id.Image != overlay.Disk || int(id.Index) >= len(h.have[id.Image]) {
			continue
		}
		b := buf[:h.o.Header.ChunkLen(id)]
		if err := s.Fetcher.ReadAt(ctx, id.Image, b, int64(id.Index)*h.cs); err != nil {
			return fmt.Errorf("reading %s: %w", id, err)
		}
		d := h.digest(b)
		var data []byte
		if d != h.zero {
			data = append([]byte(nil), b...)
		}
		if err := h.changed(id, d, data); err != nil {
			return err
		}
	}
	return nil
}

func rate(r float64) string {
	if r == 0 {
		return "not yet measured"
	}
	return bytesOf(int64(r))
}

func (c *chooser) describe() string {
	s := ""
	for _, e := range overlay.Encoders {
		if st := c.stats[e]; st != nil {
			s += fmt.Sprintf("%s %s/s %.0f%%; ", e.Name, bytesOf(int64(st.speed)), 100*st.ratio)
		}
	}
	return s
}

// writeLayer writes the layer: the pushed segments none of whose chunks
// changed since, then segments of every other chunk that differs from
// the overlay, the base and zeros. The last are compressed with the
// fastest codec: the VM is stopped while they are.
func (h *sender) writeLayer(state []byte) (*Result, error) {
	valid := make([]bool, len(h.segs))
	for i, p := range h.segs {
		valid[i] = true
		for _, c := range p.chunks {
			if h.where[c.Image][c.Index] != int32(i) || !h.isData(c) {
				valid[i] = false
				break
			}
		}
	}
	for i, p := range h.segs {
		if !valid[i] {
			for _, c := range p.chunks {
				if h.where[c.Image][c.Index] == int32(i) {
					h.where[c.Image][c.Index] = -1
				}
			}
		}
	}
	m := &overlay.Manifest{Parent: &overlay.Parent{ID: h.o.ID, Location: h.opt.ParentLocation}}
	var final []overlay.ChunkID
	for _, img := range overlay.Images {
		refs := make([]overlay.Ref, len(h.have[img]))
		for i, d := range h.have[img] {
			switch {
			case d == h.orig[img][i]:
				refs[i] = overlay.Ref{Kind: overlay.ParentDisk + overlay.Kind(img), Index: uint32(i)}
			case d == h.zero:
				refs[i] = overlay.Ref{Kind: overlay.Zero}
			default:
				if r, ok := h.base.Lookup(d); ok {
					refs[i] = r
				} else {
					refs[i] = overlay.Ref{Kind: overlay.Data}
					if h.where[img][i] < 0 {
						final = append(final, overlay.ChunkID{Image: img, Index: uint32(i)})
					}
				}
			}
		}
		m.Refs[img] = refs
	}
	type piece struct {
		pushed int // index into h.segs, or -1
		raw    []byte
	}
	var pieces []piece
	place := func(c overlay.ChunkID) {
		m.Refs[c.Image][c.Index].Index = uint32(len(m.Order))
		m.Order = append(m.Order, c)
	}
	h.mu.Lock()
	res := &Result{Stopped: h.stopAt, Rounds: h.round + 1, PushedBytes: h.pushedB}
	h.mu.Unlock()
	for i, p := range h.segs {
		if !valid[i] {
			continue
		}
		seg := overlay.Segment{Codec: p.enc.Codec, First: len(m.Order), Count: len(p.chunks), Raw: uint32(p.raw)}
		for _, c := range p.chunks {
			place(c)
		}
		m.Segments = append(m.Segments, seg)
		pieces = append(pieces, piece{pushed: i})
	}
	ctx := context.Background()
	var raw []byte
	var ids []overlay.ChunkID
	flush := func() {
		if len(ids) == 0 {
			return
		}
		seg := overlay.Segment{Codec: overlay.CodecZstd, First: len(m.Order), Count: len(ids), Raw: uint32(len(raw))}
		for _, c := range ids {
			place(c)
		}
		m.Segments = append(m.Segments, seg)
		pieces = append(pieces, piece{pushed: -1, raw: raw})
		raw, ids = nil, nil
	}
	buf := make([]byte, h.cs)
	for _, c := range final {
		b := buf[:h.o.Header.ChunkLen(c)]
		var err error
		if c.Image == overlay.Memory {
			_, err = h.mem.ReadAt(b, int64(c.Index)*h.cs)
		} else {
			err = h.opt.Session.Fetcher.ReadAt(ctx, c.Image, b, int64(c.Index)*h.cs)
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s for the layer: %w", c, err)
		}
		raw = append(raw, b...)
		ids = append(ids, c)
		if len(raw) >= h.opt.SegmentSize {
			flush()
		}
	}
	flush()
	hd := &overlay.Header{Version: overlay.LayeredVersion, ChunkSize: uint32(h.cs),
		DiskSize: h.o.Header.DiskSize, MemorySize: h.o.Header.MemorySize, BaseID: h.o.Header.BaseID, MetaCodec: overlay.CodecZstd}
	fast := overlay.Encoders[1]
	out := filepath.Join(h.opt.Dir, "layer.overlay")
	id, err := overlay.Assemble(out, hd, m, state, h.o.VMConfig, func(i int) ([]byte, error) {
		p := pieces[i]
		if p.pushed < 0 {
			stored, err := fast.Encode(p.raw)
			res.FinalBytes += int64(len(stored))
			return stored, err
		}
		sp := h.segs[p.pushed]
		b := make([]byte, sp.n)
		if _, err := h.segFile.ReadAt(b, sp.off); err != nil {
			return nil, err
		}
		res.PushedUsed += int64(len(b))
		return b, nil
	})
	if err != nil {
		return nil, err
	}
	// Read it back as the destination will, before it is asked to.
	if err := checkLayer(out); err != nil {
		os.Remove(out)
		return nil, fmt.Errorf("the layer written does not read back: %w", err)
	}
	res.Layer, res.ID = out, id
	res.LayerBytes, res.MetadataBytes = hd.TotalLen(), hd.MetadataLen()
	h.event(StepLayer, 0, res.MetadataBytes, fmt.Sprintf("layer %s written: %s of metadata, %s sent ahead and used, %s left to fetch", id.Short(), bytesOf(res.MetadataBytes), bytesOf(res.PushedUsed), bytesOf(res.FinalBytes)))
	return res, nil
}

func bytesOf(n int64) string { return humanize.IBytes(uint64(n)) }

// checkLayer opens a layer's metadata as a reader of it would, which
// checks the manifest against the segments whole; the segments' digests
// are of the bytes just written.
func checkLayer(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	_, err = overlay.Open(f, st.Size())
	return err
}

// isData reports whether the layer carries chunk c's bytes: they are not
// the overlay's, zeros or the base's.
func (h *sender) isData(c overlay.ChunkID) bool {
	d := h.have[c.Image][c.Index]
	if d == h.orig[c.Image][c.Index] || d == h.zero {
		return false
	}
	_, inBase := h.base.Lookup(d)
	return !inBase
}
