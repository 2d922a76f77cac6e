package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

func overlayCommand() *cli.Command {
	return &cli.Command{
		Name:  "overlay",
		Usage: "create, capture, reorder, inspect, verify and extract VM overlays",
		Subcommands: []*cli.Command{
			overlayCaptureCommand(),
			overlayReorderCommand(),
			{
				Name:      "create",
				Usage:     "build an overlay of a custom VM against a registered base",
				UsageText: "cloudletfs overlay create --base ID|NAME --disk FILE --memory FILE --state FILE [--vm-config FILE] [--segment-size SIZE] [--codec xz|zstd] [--trace TRACE]... -o OUT",
				Description: `Each chunk of the custom disk and memory images becomes the cheapest of: zero; a
chunk of the base disk or base memory at any offset; a repeat of another chunk of this
overlay; or data. Only data travels in segments, compressed in parallel.

Segments stream in this order: the chunks named by the --trace traces, in order of
first access (trace after trace), then the remaining memory chunks by offset, then
the remaining disk chunks by offset. docs/FORMAT.md describes the trace format.`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "base", Required: true, Usage: "base VM, by ID or NAME"},
					&cli.PathFlag{Name: "disk", Required: true, Usage: "custom VM's raw disk image"},
					&cli.PathFlag{Name: "memory", Required: true, Usage: "custom VM's raw memory image"},
					&cli.PathFlag{Name: "state", Required: true, Usage: "custom VM's QEMU device state"},
					&cli.PathFlag{Name: "vm-config", Usage: "vm.json to carry in the overlay"},
					&cli.StringFlag{Name: "segment-size", Value: "1MiB", Usage: "uncompressed bytes per segment, rounded to whole chunks"},
					&cli.StringFlag{Name: "codec", Value: "xz", Usage: "segment codec: xz (smallest) or zstd (fastest to decode)"},
					traceFlag("access trace whose chunks stream first (repeatable)", "order"),
					&cli.PathFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "overlay file to write"},
					&cli.StringFlag{Name: "parent", Usage: "build a layered overlay on this `OVERLAY` (a path or URL): only what differs from the parent's VM is carried, and mount, launch and extract fetch the rest from the parent"},
					&cli.StringFlag{Name: "parent-location", Usage: "where readers of the layer fetch the parent: a URL, or a path or URL relative to the layer's own (default: --parent as given if a URL, else its path relative to --output)"},
					jobsFlag,
				},
				Action: overlayCreate,
			},
			{
				Name:      "info",
				Usage:     "describe an overlay: base, sizes, codec, segments and chunks by kind",
				ArgsUsage: "FILE",
				Flags:     []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action:    overlayInfo,
			},
			{
				Name:      "verify",
				Usage:     "check every digest of an overlay and decode every segment",
				ArgsUsage: "FILE",
				Flags:     []cli.Flag{jobsFlag},
				Action:    overlayVerify,
			},
			{
				Name:      "extract",
				Usage:     "rebuild the custom VM's files from an overlay and its base (full synthesis)",
				UsageText: "cloudletfs overlay extract [--base ID|NAME] FILE -o DIR",
				Description: `Writes DIR/disk.img, DIR/memory.img, DIR/state and, if the overlay carries one,
DIR/vm.json, byte-identical to what 'overlay create' was given. Without --base, the
base is found in the registry by the ID the overlay records.`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "base", Usage: "base VM, by ID or NAME (default: the overlay's own base ID)"},
					&cli.PathFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "directory to write the VM's files into"},
					jobsFlag,
				},
				Action: overlayExtract,
			},
		},
	}
}

func overlayCreate(c *cli.Context) error {
	segSize, err := humanize.ParseBytes(c.String("segment-size"))
	if err != nil || segSize == 0 || segSize > overlay.MaxSegmentRaw {
		return badFlag("--segment-size %q: want a size such as 1MiB or 256KiB, at most %s", c.String("segment-size"), humanize.IBytes(overlay.MaxSegmentRaw))
	}
	codec, err := overlay.ParseCodec(c.String("codec"))
	if err != nil || codec == overlay.CodecNone {
		return badFlag("--codec %q: want xz or zstd", c.String("codec"))
	}
	out := c.Path("output")

	in, closeInput, err := overlay.OpenInput(c.Path("disk"), c.Path("memory"), c.Path("state"), c.Path("vm-config"))
	if err != nil {
		return err
	}
	defer closeInput()

	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	rec, err := st.Resolve(c.String("base"))
	if err != nil {
		return err
	}
	base, closeBase, err := st.Open(rec)
	if err != nil {
		return err
	}
	defer closeBase()

	var chunks [2]int
	for _, img := range overlay.Images {
		chunks[img] = int((in.Sizes[img] + int64(rec.ChunkSize) - 1) / int64(rec.ChunkSize))
	}
	var seq []overlay.ChunkID
	for _, path := range c.StringSlice("trace") {
		tr, err := order.ParseFile(path)
		if err != nil {
			return err
		}
		if err := order.Check(tr.Accesses, chunks); err != nil {
			return fmt.Errorf("trace %s: %w", path, err)
		}
		seq = append(seq, order.FirstAccess(tr.Accesses)...)
	}

	var parent *overlay.ParentHashes
	if ref := c.String("parent"); ref != "" {
		if parent, err = parentHashes(c, ref, out, base); err != nil {
			return err
		}
	} else if c.IsSet("parent-location") {
		return badFlag("--parent-location needs --parent")
	}

	p := newProgress(c.App.ErrWriter)
	start := time.Now()
	sum, err := overlay.Build(out, base, in, overlay.BuildOptions{
		Parent:      parent,
		SegmentSize: int(segSize),
		Codec:       codec,
		Workers:     c.Int("jobs"),
		Order:       seq,
		Progress:    p.add,
		Context:     c.Context,
	})
	p.done()
	if err != nil {
		return outputError(c, out, err)
	}
	printSummary(c.App.Writer, out, sum, codec, time.Since(start))
	return nil
}

// parentHashes resolves the parent named by --parent, with its own chain,
// and hashes its VM's images, for a layer built on it at out.
func parentHashes(c *cli.Context, ref, out string, base *overlay.Base) (*overlay.ParentHashes, error) {
	src, err := openParentSource(ref)
	if err != nil {
		return nil, fmt.Errorf("--parent: %w", err)
	}
	defer src.Close()
	po, err := fetch.OpenOverlay(c.Context, src)
	if err != nil {
		return nil, fmt.Errorf("--parent: %w", err)
	}
	if po.Header.BaseID != base.ID {
		return nil, fmt.Errorf("--parent %s is built on base %s, not on --base %s: a layer and its parent share one base", ref, po.Header.BaseID.Short(), base.ID.Short())
	}
	chain, err := fetch.OpenParents(c.Context, po, ref, openParentSource)
	if err != nil {
		return nil, err
	}
	defer closeLayers(chain)
	chain = append([]fetch.Layer{{Overlay: po, Source: src, Ref: ref}}, chain...)
	imgs, cleanup, err := fetch.ExtractChain(c.Context, chain, base, existingAbove(out), c.Int("jobs"))
	if err != nil {
		return nil, err
	}
	defer cleanup()
	ph := &overlay.ParentHashes{Parent: overlay.Parent{ID: po.ID, Location: c.String("parent-location")}}
	if ph.Parent.Location == "" {
		ph.Parent.Location = ref
		if !strings.Contains(ref, "://") {
			abs, err1 := filepath.Abs(ref)
			dir, err2 := filepath.Abs(filepath.Dir(out))
			if rel, err3 := filepath.Rel(dir, abs); err1 == nil && err2 == nil && err3 == nil {
				ph.Parent.Location = rel
			}
		}
	}
	for _, img := range overlay.Images {
		_, hs, err := overlay.HashImage(imgs[img], po.Header.ImageSize(img), int(po.Header.ChunkSize), c.Int("jobs"), nil)
		if err != nil {
			return nil, fmt.Errorf("--parent %s: hashing its %s: %w", ref, img, err)
		}
		ph.Hashes[img] = hs
	}
	return ph, nil
}

// existingAbove returns the nearest directory above path that exists: the
// parents of a layer are extracted there, beside what is being written.
func existingAbove(path string) string {
	dir := filepath.Dir(path)
	for {
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			return dir
		}
		up := filepath.Dir(dir)
		if up == dir {
			return os.TempDir()
		}
		dir = up
	}
}

// openParentSource opens a parent overlay's file or URL.
func openParentSource(ref string) (fetch.Source, error) {
	return fetch.OpenSource(ref, fetch.DefaultClient(nil), nil)
}

func closeLayers(chain []fetch.Layer) {
	for _, l := range chain {
		l.Source.Close()
	}
}

// traceFlag is the flag that names the access traces a command reads:
// one name for every command, with the name it had before as an alias.
func traceFlag(usage string, aliases ...string) cli.Flag {
	return &cli.StringSliceFlag{Name: "trace", Aliases: aliases, Usage: usage}
}

// outputError describes a failure to write the overlay out: an
// interruption in one line, and anything else with the file's name.
func outputError(c *cli.Context, out string, err error) error {
	if c.Context.Err() != nil && errors.Is(err, context.Canceled) {
		return fmt.Errorf("interrupted: %s not written", out)
	}
	return fmt.Errorf("overlay %s: %w", out, err)
}

func printSummary(w io.Writer, out string, s *overlay.Summary, codec overlay.Codec, took time.Duration) {
	fmt.Fprintf(w, "wrote %s in %s: %s in %d %s segments, overlay ID %s\n", out, took.Round(time.Millisecond),
		humanize.IBytes(uint64(s.OverlaySize)), s.Segments, codec, s.ID.Short())
	printCounts(w, s.Counts)
	printChanged(w, s)
	share := "no bytes changed"
	if s.ChangedBytes > 0 {
		share = fmt.Sprintf("the overlay is %.1f%% of the changed bytes", 100*float64(s.OverlaySize)/float64(s.ChangedBytes))
	}
	fmt.Fprintf(w, "changed %s; data in segments %s, compressed to %s; %s\n",
		humanize.IBytes(uint64(s.ChangedBytes)), humanize.IBytes(uint64(s.DataBytes)), humanize.IBytes(uint64(s.OverlaySize)), share)
}

func printCounts(w io.Writer, counts [2][len(overlay.Kinds)]int) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "chunks\tdisk\tmemory\t")
	for _, k := range overlay.Kinds {
		fmt.Fprintf(tw, "%s\t%d\t%d\t\n", k, counts[overlay.Disk][k], counts[overlay.Memory][k])
	}
	tw.Flush()
}

// printChanged says what became of the chunks that differ from the base:
// how many were zero (freed and trimmed ones among them), found in the base
// or elsewhere in the VM, and how many travel as data.
func printChanged(w io.Writer, s *overlay.Summary) {
	var by [len(overlay.Kinds)]int
	total := 0
	for _, img := range overlay.Images {
		for k, n := range s.ChangedCounts[img] {
			by[k] += n
			total += n
		}
	}
	fmt.Fprintf(w, "changed chunks: %d; zero %d, in the base %d, repeated in the VM %d, data %d\n", total,
		by[overlay.Zero], by[overlay.BaseDisk]+by[overlay.BaseMemory], by[overlay.Self], by[overlay.Data])
}

// openOverlay opens and verifies an overlay file's metadata. Errors name the
// file.
func openOverlay(path string) (*overlay.Overlay, *os.File, error) {
	return openOverlayContext(context.Background(), path)
}

// openOverlayContext opens an overlay whose reads fail once ctx ends, so
// that a long pass over its segments stops on a signal.
func openOverlayContext(ctx context.Context, path string) (*overlay.Overlay, *os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("overlay: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("overlay %s: %w", path, err)
	}
	o, err := overlay.Open(ctxReaderAt{ctx, f}, st.Size())
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("overlay %s: %w", path, err)
	}
	return o, f, nil
}

// ctxReaderAt fails every read once ctx has ended.
type ctxReaderAt struct {
	ctx context.Context
	r   io.ReaderAt
}

func (r ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.ReadAt(p, off)
}

// overlayArg opens the overlay named by the command's one argument.
func overlayArg(c *cli.Context, what string) (string, *overlay.Overlay, *os.File, error) {
	if err := need(c, 1, what); err != nil {
		return "", nil, nil, err
	}
	path := c.Args().First()
	o, f, err := openOverlayContext(c.Context, path)
	return path, o, f, err
}

// infoJSON is the shape of `overlay info --json`.
type infoJSON struct {
	ID          string                    `json:"id"`
	Version     int                       `json:"version"`
	BaseID      string                    `json:"base_id"`
	ChunkSize   int                       `json:"chunk_size"`
	DiskSize    int64                     `json:"disk_size"`
	MemorySize  int64                     `json:"memory_size"`
	Codecs      map[string]int            `json:"segment_codecs"`
	MetaCodec   string                    `json:"metadata_codec"`
	Size        int64                     `json:"size"`
	MetadataLen int64                     `json:"metadata_bytes"`
	StateSize   int                       `json:"state_bytes"`
	HasVMConfig bool                      `json:"has_vm_config"`
	Segments    []segmentJSON             `json:"segments"`
	Chunks      map[string]map[string]int `json:"chunks"`
	Parent      *parentJSON               `json:"parent,omitempty"`
}

// parentJSON is the parent a layered overlay names.
type parentJSON struct {
	ID       string `json:"id"`
	Location string `json:"location"`
}

type segmentJSON struct {
	Offset int64  `json:"offset"`
	Stored uint32 `json:"stored"`
	Raw    uint32 `json:"raw"`
	Codec  string `json:"codec"`
	Chunks int    `json:"chunks"`
	SHA256 string `json:"sha256"`
}

func describe(o *overlay.Overlay) infoJSON {
	h := o.Header
	info := infoJSON{
		ID: o.ID.String(), Version: int(h.Version), BaseID: h.BaseID.String(), ChunkSize: int(h.ChunkSize),
		DiskSize: int64(h.DiskSize), MemorySize: int64(h.MemorySize), Codecs: map[string]int{},
		MetaCodec: h.MetaCodec.String(), Size: h.TotalLen(), MetadataLen: h.MetadataLen(),
		StateSize: len(o.State), HasVMConfig: o.VMConfig != nil, Segments: []segmentJSON{},
		Chunks: map[string]map[string]int{},
	}
	if p := o.Manifest.Parent; p != nil {
		info.Parent = &parentJSON{ID: p.ID.String(), Location: p.Location}
	}
	for _, s := range o.Manifest.Segments {
		info.Codecs[s.Codec.String()]++
		info.Segments = append(info.Segments, segmentJSON{s.Offset, s.Stored, s.Raw, s.Codec.String(), s.Count, s.SHA.String()})
	}
	counts := o.Manifest.Counts()
	for _, img := range overlay.Images {
		m := map[string]int{}
		for _, k := range overlay.Kinds {
			m[k.String()] = counts[img][k]
		}
		info.Chunks[img.String()] = m
	}
	return info
}

func overlayInfo(c *cli.Context) error {
	_, o, f, err := overlayArg(c, "one overlay FILE")
	if err != nil {
		return err
	}
	defer f.Close()
	info := describe(o)
	w := c.App.Writer
	if c.Bool("json") {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(info)
	}
	var stored, raw int64
	var minS, maxS uint32
	for i, s := range o.Manifest.Segments {
		stored += int64(s.Stored)
		raw += int64(s.Raw)
		if i == 0 || s.Stored < minS {
			minS = s.Stored
		}
		maxS = max(maxS, s.Stored)
	}
	fmt.Fprintf(w, "overlay     %s (format version %d)\n", info.ID, info.Version)
	fmt.Fprintf(w, "base        %s\n", info.BaseID)
	if info.Parent != nil {
		fmt.Fprintf(w, "parent      %s at %s\n", info.Parent.ID, info.Parent.Location)
	}
	fmt.Fprintf(w, "disk        %s (%d bytes)\n", humanize.IBytes(uint64(info.DiskSize)), info.DiskSize)
	fmt.Fprintf(w, "memory      %s (%d bytes)\n", humanize.IBytes(uint64(info.MemorySize)), info.MemorySize)
	fmt.Fprintf(w, "chunk size  %d\n", info.ChunkSize)
	fmt.Fprintf(w, "size        %s, of which metadata %s (state %s, vm.json %v)\n", humanize.IBytes(uint64(info.Size)),
		humanize.IBytes(uint64(info.MetadataLen)), humanize.IBytes(uint64(info.StateSize)), info.HasVMConfig)
	var codecs []string
	for name, n := range info.Codecs {
		codecs = append(codecs, fmt.Sprintf("%s (%d segments)", name, n))
	}
	sort.Strings(codecs)
	if len(codecs) == 0 {
		codecs = []string{"no segments"}
	}
	fmt.Fprintf(w, "codec       %s; metadata %s\n", strings.Join(codecs, ", "), info.MetaCodec)
	if n := len(o.Manifest.Segments); n > 0 {
		fmt.Fprintf(w, "segments    %d: %s stored from %s raw; stored size min %s, mean %s, max %s\n", n,
			humanize.IBytes(uint64(stored)), humanize.IBytes(uint64(raw)), humanize.IBytes(uint64(minS)),
			humanize.IBytes(uint64(stored/int64(n))), humanize.IBytes(uint64(maxS)))
	} else {
		fmt.Fprintf(w, "segments    0\n")
	}
	printCounts(w, o.Manifest.Counts())
	return nil
}

func overlayVerify(c *cli.Context) error {
	path, o, f, err := overlayArg(c, "one overlay FILE")
	if err != nil {
		return err
	}
	defer f.Close()
	p := newProgress(c.App.ErrWriter)
	err = o.Verify(c.Int("jobs"), func(n, total int64) { p.add("verifying", n, total) })
	p.done()
	if err != nil {
		return fmt.Errorf("overlay %s: %w", path, err)
	}
	fmt.Fprintf(c.App.Writer, "overlay %s is intact: header, manifest, state and %d segments verified\n", path, len(o.Manifest.Segments))
	return nil
}

func overlayExtract(c *cli.Context) error {
	path, o, f, err := overlayArg(c, "one overlay FILE")
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	var rec *store.Base
	if ref := c.String("base"); ref != "" {
		rec, err = st.Resolve(ref)
	} else if rec, err = st.Resolve(o.Header.BaseID.String()); err != nil {
		err = fmt.Errorf("overlay %s needs base %s, which is not in the registry: import it, or name one with --base", path, o.Header.BaseID)
	}
	if err != nil {
		return err
	}
	base, closeBase, err := st.Open(rec)
	if err != nil {
		return err
	}
	defer closeBase()
	dir := c.Path("output")
	if o.Header.Layered() {
		chain, err := fetch.OpenParents(c.Context, o, path, openParentSource)
		if err != nil {
			return err
		}
		defer closeLayers(chain)
		imgs, cleanup, err := fetch.ExtractChain(c.Context, chain, base, existingAbove(dir), c.Int("jobs"))
		if err != nil {
			return err
		}
		defer cleanup()
		o.SetParentImages(imgs)
	}
	p := newProgress(c.App.ErrWriter)
	start := time.Now()
	err = overlay.ExtractContext(c.Context, o, base, dir, c.Int("jobs"), func(n, total int64) { p.add("extracting", n, total) })
	p.done()
	if err != nil {
		if c.Context.Err() != nil {
			return fmt.Errorf("interrupted: %s left as it was", dir)
		}
		return fmt.Errorf("overlay %s: %w", path, err)
	}
	fmt.Fprintf(c.App.Writer, "extracted %s into %s in %s\n", path, dir, time.Since(start).Round(time.Millisecond))
	return nil
}
