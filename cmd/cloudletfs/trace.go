package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/serve"
)

func orderCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "trace",
			Usage: "inspect and combine access traces",
			Subcommands: []*cli.Command{
				{
					Name:      "show",
					Usage:     "summarize a trace: chunks and bytes by image, time span, working set over time",
					ArgsUsage: "TRACE",
					Flags:     []cli.Flag{&cli.IntFlag{Name: "chunk-size", Value: overlay.DefaultChunkSize, Usage: "bytes per chunk"}},
					Action:    traceShow,
				},
				{
					Name:      "merge",
					Usage:     "combine the traces of several runs into one order",
					UsageText: "cloudletfs trace merge [--strategy earliest|median|weighted] [--min-runs N] TRACE... -o OUT",
					Description: `Each run contributes the first access of each chunk. --strategy sets a chunk's merged
time: earliest (the earliest run), median (over the runs that touched it) or weighted
(the mean over all runs, counting the end of a run that never touched the chunk, so
chunks only some runs need move back). Chunks seen in fewer than --min-runs runs are
dropped. Each mark is the median over the runs that have it.`,
					Flags: []cli.Flag{
						&cli.StringFlag{Name: "strategy", Value: string(order.Weighted), Usage: "earliest, median or weighted"},
						&cli.IntFlag{Name: "min-runs", Value: 1, Usage: "keep chunks seen in at least this many runs"},
						&cli.PathFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "merged trace to write"},
					},
					Action: traceMerge,
				},
			},
		},
		{
			Name:      "replay",
			Usage:     "predict a launch of an overlay on a link from a recorded trace",
			UsageText: "cloudletfs replay --overlay O --trace T [--rate 38mbit --rtt 20ms] [--policy demand-only|stream|stream+demand] [--tune] [--plot FILE.svg]",
			Description: `Replays the accesses of a trace, with the think time between them, against the
overlay's segments on a modelled link: one shared link, a round trip per request,
decode time per codec. Prints the predicted time to ready, first response (the
first-response mark that 'launch --probe' records), the stall (wall-clock time in which
at least one read waited), the wait total (every read's wait, summed) and bytes fetched.
--tune tries segment sizes from 64 KiB to 4 MiB, each with the overlay's own order and
with the order of the --order-trace runs merged by each strategy (earliest, median,
weighted), and ranks them by predicted first response.`,
			Flags: []cli.Flag{
				&cli.PathFlag{Name: "overlay", Required: true, Usage: "overlay file"},
				&cli.PathFlag{Name: "trace", Required: true, Usage: "trace of a launch"},
				&cli.StringFlag{Name: "rate", Value: "38mbit", Usage: "link rate"},
				&cli.DurationFlag{Name: "rtt", Value: 20 * time.Millisecond, Usage: "round-trip time"},
				&cli.StringFlag{Name: "policy", Value: string(order.StreamDemand), Usage: "demand-only, stream or stream+demand"},
				&cli.DurationFlag{Name: "startup", Value: 60 * time.Millisecond, Usage: "local cost of a mount before any network use"},
				&cli.BoolFlag{Name: "tune", Usage: "rank segment sizes and orders by predicted first response"},
				&cli.StringSliceFlag{Name: "order-trace", Usage: "traces whose merge gives the orders --tune tries (repeatable; default: --trace)"},
				&cli.BoolFlag{Name: "accesses", Usage: "print when each access was issued and served"},
				&cli.PathFlag{Name: "plot", Usage: "draw the timeline as SVG into FILE"},
			},
			Action: replayCmd,
		},
	}
}

func overlayReorderCommand() *cli.Command {
	return &cli.Command{
		Name:      "reorder",
		Usage:     "write an overlay again in the order of recorded traces",
		UsageText: "cloudletfs overlay reorder IN --trace TRACE... [--segment-size SIZE] [--strategy ...] -o OUT",
		Description: `Writes the same VM, byte for byte, in a new stream order and segmentation: the chunks
the traces touched first come first (traces combined as by 'trace merge'); the rest keep
the order they had in IN. Needs only IN and its base.`,
		Flags: []cli.Flag{
			traceFlag("trace of a run (repeatable)"),
			&cli.StringFlag{Name: "strategy", Value: string(order.Weighted), Usage: "how to combine several traces: earliest, median or weighted"},
			&cli.StringFlag{Name: "segment-size", Value: "1MiB", Usage: "uncompressed bytes per segment"},
			&cli.StringFlag{Name: "codec", Usage: "segment codec (default: that of IN)"},
			&cli.StringFlag{Name: "base", Usage: "base VM, by ID or NAME (default: the overlay's own base ID)"},
			&cli.PathFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "overlay file to write"},
			jobsFlag,
		},
		Action: overlayReorder,
	}
}

// readTraces parses and merges traces, checking them against an overlay
// when one is given.
func readTraces(paths []string, strategy string, o *overlay.Overlay) (*order.Trace, error) {
	s, err := order.ParseStrategy(strategy)
	if err != nil {
		return nil, badFlag("--strategy: %v", err)
	}
	var runs []*order.Trace
	for _, p := range paths {
		t, err := order.ParseFile(p)
		if err != nil {
			return nil, err
		}
		if o != nil {
			if err := order.Check(t.Accesses, [2]int{o.Header.Chunks(overlay.Disk), o.Header.Chunks(overlay.Memory)}); err != nil {
				return nil, fmt.Errorf("trace %s: %w", p, err)
			}
		}
		runs = append(runs, t)
	}
	if len(runs) == 1 {
		return runs[0], nil
	}
	return order.Merge(runs, s, 1)
}

func traceShow(c *cli.Context) error {
	if err := need(c, 1, "one TRACE"); err != nil {
		return err
	}
	t, err := order.ParseFile(c.Args().First())
	if err != nil {
		return err
	}
	s := order.Summarize(t, c.Int("chunk-size"), 10)
	w := c.App.Writer
	fmt.Fprintf(w, "trace %s\n", c.Args().First())
	for _, img := range overlay.Images {
		fmt.Fprintf(w, "  %-7s %7d chunks  %s\n", img, s.Chunks[img], humanize.IBytes(uint64(s.Bytes[img])))
	}
	fmt.Fprintf(w, "  span    %.3f s to %.3f s\n", s.Start, s.End)
	for _, m := range t.Marks {
		fmt.Fprintf(w, "  mark    %s at %.3f s\n", m.Name, m.Time)
	}
	fmt.Fprintln(w, "  working set:")
	for _, p := range s.WorkingSet {
		fmt.Fprintf(w, "    %8.3f s  %8.1f MiB\n", p.Time, float64(p.Bytes)/(1<<20))
	}
	return nil
}

func traceMerge(c *cli.Context) error {
	if c.NArg() == 0 {
		return fmt.Errorf("trace merge: want at least one TRACE (see --help)")
	}
	s, err := order.ParseStrategy(c.String("strategy"))
	if err != nil {
		return badFlag("--strategy: %v", err)
	}
	var runs []*order.Trace
	for _, p := range c.Args().Slice() {
		if c.Context.Err() != nil {
			return fmt.Errorf("interrupted: %s not written", c.Path("output"))
		}
		t, err := order.ParseFile(p)
		if err != nil {
			return err
		}
		runs = append(runs, t)
	}
	m, err := order.Merge(runs, s, c.Int("min-runs"))
	if err != nil {
		return err
	}
	out := c.Path("output")
	write := func(w io.Writer) error {
		fmt.Fprintf(w, "# cloudletfs trace: %d runs merged (%s)\n", len(runs), s)
		if err := order.Write(w, m); err != nil {
			return err
		}
		// A stop that came during the write keeps the file from
		// appearing.
		return c.Context.Err()
	}
	if err := overlay.WriteFile(c.Context, out, write); err != nil {
		if c.Context.Err() != nil && errors.Is(err, context.Canceled) {
			return fmt.Errorf("interrupted: %s not written", out)
		}
		return fmt.Errorf("trace %s: %w", out, err)
	}
	fmt.Fprintf(c.App.Writer, "merged %d runs (%s) into %s: %d chunks\n", len(runs), s, out, len(m.Accesses))
	return nil
}

func overlayReorder(c *cli.Context) error {
	path, o, f, err := overlayArg(c, "one overlay IN")
	if err != nil {
		return err
	}
	defer f.Close()
	if len(c.StringSlice("trace")) == 0 {
		return fmt.Errorf("overlay reorder: --trace is required (see cloudletfs overlay reorder --help)")
	}
	t, err := readTraces(c.StringSlice("trace"), c.String("strategy"), o)
	if err != nil {
		return err
	}
	segSize, err := humanize.ParseBytes(c.String("segment-size"))
	if err != nil || segSize == 0 || segSize > overlay.MaxSegmentRaw {
		return badFlag("--segment-size %q: want a size such as 1MiB, at most %s", c.String("segment-size"), humanize.IBytes(overlay.MaxSegmentRaw))
	}
	codec := overlay.CodecXZ
	if len(o.Manifest.Segments) > 0 {
		codec = o.Manifest.Segments[0].Codec
	}
	if name := c.String("codec"); name != "" {
		if codec, err = overlay.ParseCodec(name); err != nil || codec == overlay.CodecNone {
			return badFlag("--codec %q: want xz or zstd", name)
		}
	}
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	rec, err := resolveBase(st, c.String("base"), o, path)
	if err != nil {
		return err
	}
	base, closeBase, err := st.Open(rec)
	if err != nil {
		return err
	}
	defer closeBase()
	out := c.Path("output")
	start := time.Now()
	sum, err := overlay.Reorder(out, o, base, order.FirstAccess(t.Accesses), overlay.BuildOptions{
		SegmentSize: int(segSize), Codec: codec, Workers: c.Int("jobs"), Context: c.Context})
	if se := (*overlay.SourceError)(nil); errors.As(err, &se) {
		return fmt.Errorf("overlay %s: %w: run 'cloudletfs overlay verify %s'", path, err, path)
	}
	if err != nil {
		return outputError(c, out, err)
	}
	printSummary(c.App.Writer, out, sum, codec, time.Since(start))
	return nil
}

func replayCmd(c *cli.Context) error {
	o, f, err := openOverlayContext(c.Context, c.Path("overlay"))
	if err != nil {
		return err
	}
	defer f.Close()
	t, err := readTraces([]string{c.Path("trace")}, string(order.Weighted), o)
	if err != nil {
		return err
	}
	rate, err := serve.ParseRate(c.String("rate"))
	if err != nil || rate <= 0 {
		return badFlag("--rate %q: want a link rate such as 38mbit", c.String("rate"))
	}
	p, err := order.ParsePolicy(c.String("policy"))
	if err != nil {
		return badFlag("--policy: %v", err)
	}
	m := order.Model{Rate: rate, RTT: c.Duration("rtt").Seconds(), Decode: order.DefaultDecode, Startup: c.Duration("startup").Seconds()}
	w := c.App.Writer
	if c.Bool("tune") {
		paths := c.StringSlice("order-trace")
		if len(paths) == 0 {
			paths = []string{c.Path("trace")}
		}
		var runs []*order.Trace
		for _, path := range paths {
			rt, err := readTraces([]string{path}, string(order.Weighted), o)
			if err != nil {
				return err
			}
			runs = append(runs, rt)
		}
		return tune(c.Context, w, o, t, runs, m, p)
	}
	r := order.Replay(order.LayoutOf(o), t, m, p)
	fmt.Fprintf(w, "replay of %s on %s/s, RTT %s, %s\n", filepath.Base(c.Path("overlay")), humanize.SI(rate*8, "bit"), c.Duration("rtt"), p)
	fmt.Fprintf(w, "  ready (QEMU can resume)  %8.3f s\n", r.Ready)
	if r.FirstResponse >= 0 {
		fmt.Fprintf(w, "  first response           %8.3f s\n", r.FirstResponse)
	} else {
		fmt.Fprintf(w, "  first response           (the trace has no %s mark)\n", order.FirstResponse)
	}
	if n := len(r.Served); n > 0 {
		fmt.Fprintf(w, "  last access served       %8.3f s  (%d accesses)\n", r.Served[n-1], n)
	}
	fmt.Fprintf(w, "  physical limit           %8.3f s  (%s needed before the first response, + 1 RTT)\n", r.Limit(m), humanize.IBytes(uint64(r.Needed)))
	fmt.Fprintf(w, "  stall                    %8.3f s  (wall-clock time in which a read waited)\n", r.Stall)
	fmt.Fprintf(w, "  wait total               %8.3f s  (every read's wait, summed)\n", r.WaitTotal)
	fmt.Fprintf(w, "  bytes fetched            %8s of %s\n", humanize.IBytes(uint64(r.BytesFetched)), humanize.IBytes(uint64(o.Header.TotalLen())))
	if c.Bool("accesses") {
		fmt.Fprintln(w, "  issued (s)  served (s)   wait (s)  chunk")
		for i, a := range r.Accesses {
			fmt.Fprintf(w, "  %10.4f  %10.4f  %9.4f  %s\n", r.Issued[i], r.Served[i], r.Served[i]-r.Issued[i], a.Chunk)
		}
	}
	if path := c.Path("plot"); path != "" {
		title := fmt.Sprintf("%s, %s, %s", filepath.Base(c.Path("overlay")), c.String("rate"), p)
		if err := overlay.WriteFile(c.Context, path, func(w io.Writer) error { return order.Plot(w, r, title) }); err != nil {
			return fmt.Errorf("--plot %s: %w", path, err)
		}
		fmt.Fprintf(w, "  timeline                 %s\n", path)
	}
	return nil
}

// tune ranks segment sizes and orders by predicted first response.
func tune(ctx context.Context, w io.Writer, o *overlay.Overlay, t *order.Trace, runs []*order.Trace, m order.Model, p order.Policy) error {
	type row struct {
		size  int64
		order string
		r     order.Result
		segs  int
	}
	orders := map[string][]overlay.ChunkID{"overlay": nil}
	for _, s := range order.Strategies {
		merged, err := order.Merge(runs, s, 1)
		if err != nil {
			return err
		}
		orders[string(s)] = order.FirstAccess(merged.Accesses)
	}
	names := []string{"overlay", string(order.Earliest), string(order.Median), string(order.Weighted)}
	var rows []row
	for size := int64(64 << 10); size <= 4<<20; size *= 2 {
		// Each replay takes a while on a long trace; a stop ends the ranking.
		if err := ctx.Err(); err != nil {
			return err
		}
		for _, name := range names {
			l := order.Resegment(o, orders[name], size)
			rows = append(rows, row{size, name, order.Replay(l, t, m, p), len(l.Segments)})
		}
	}
	key := func(r order.Result) float64 {
		if r.FirstResponse >= 0 {
			return r.FirstResponse
		}
		if n := len(r.Served); n > 0 {
			return r.Served[n-1]
		}
		return r.Ready
	}
	sort.SliceStable(rows, func(i, j int) bool { return key(rows[i].r) < key(rows[j].r) })
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "rank\tsegment\torder\tsegments\tfirst response (s)\tstall (s)\tfetched\t")
	for i, r := range rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%.3f\t%.3f\t%s\t\n", i+1, humanize.IBytes(uint64(r.size)), r.order, r.segs, key(r.r), r.r.Stall, humanize.IBytes(uint64(r.r.BytesFetched)))
	}
	return tw.Flush()
}
