package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

func baseCommand() *cli.Command {
	return &cli.Command{
		Name:  "base",
		Usage: "manage the base VMs registered on this cloudlet",
		Description: `A base VM is a disk image, a memory image and QEMU device state (and optionally a
vm.json). Overlays are built against a base and can only be used where the same base
is registered. Its ID is a sha256 over its contents. The files stay where they are:
the registry remembers their paths and notices if they change.`,
		Subcommands: []*cli.Command{
			baseCreateCommand(),
			{
				Name:      "import",
				Usage:     "register a base VM and build its chunk-hash index",
				UsageText: "cloudletfs base import --name NAME --disk FILE --memory FILE --state FILE [--vm-config FILE]",
				Description: `Hashes every file of the base, indexes every chunk of the disk and memory images
for dedup, and registers the base under NAME. The base ID is printed as the last line.`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "name", Required: true, Usage: "name to register the base under"},
					&cli.PathFlag{Name: "disk", Required: true, Usage: "raw disk image"},
					&cli.PathFlag{Name: "memory", Required: true, Usage: "raw memory image (guest RAM)"},
					&cli.PathFlag{Name: "state", Required: true, Usage: "QEMU device state"},
					&cli.PathFlag{Name: "vm-config", Usage: "vm.json describing how to run the VM"},
					&cli.IntFlag{Name: "chunk-size", Value: overlay.DefaultChunkSize, Usage: "chunk size in bytes, the unit of dedup (power of two)"},
					jobsFlag,
				},
				Action: baseImport,
			},
			{
				Name:   "list",
				Usage:  "list registered base VMs",
				Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: baseList,
			},
			{
				Name:      "rm",
				Usage:     "unregister a base VM, refused while an overlay on it is mounted",
				ArgsUsage: "ID|NAME",
				Description: `Drops the base from the registry. Files that 'base create' copied into the state
dir for it (disk, memory, state, vm.json, kernel, initrd) are removed; files of an
imported base, wherever they are, are left alone.`,
				Action: baseRm,
			},
			{
				Name:      "verify",
				Usage:     "re-hash a base's files and check them against the import",
				ArgsUsage: "ID|NAME",
				Description: `A base whose files were touched or copied keeping their bytes fails the cheap check
every mount makes (size and modification time). If every file is intact, verify records
the new size and modification time, and the base can be used again.`,
				Action: baseVerify,
			},
		},
	}
}

func baseImport(c *cli.Context) error {
	cs := c.Int("chunk-size")
	if cs < overlay.MinChunkSize || cs > overlay.MaxChunkSize || cs&(cs-1) != 0 {
		return badFlag("--chunk-size %d: want a power of two between %d and %d", cs, overlay.MinChunkSize, overlay.MaxChunkSize)
	}
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	p := newProgress(c.App.ErrWriter)
	start := time.Now()
	b, err := st.ImportContext(c.Context, c.String("name"), store.ImportFiles{
		Disk: c.Path("disk"), Memory: c.Path("memory"), State: c.Path("state"), VMConfig: c.Path("vm-config"),
	}, cs, c.Int("jobs"), func(n, total int64) { p.add("hashing", n, total) })
	p.done()
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "imported base %q in %s: disk %s, memory %s, state %s\n", b.Name, time.Since(start).Round(time.Millisecond),
		humanize.IBytes(uint64(b.Disk.Size)), humanize.IBytes(uint64(b.Memory.Size)), humanize.IBytes(uint64(b.State.Size)))
	fmt.Fprintln(w, b.ID)
	return nil
}

func baseList(c *cli.Context) error {
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	bases, err := st.List()
	if err != nil {
		return err
	}
	if c.Bool("json") {
		out := make([]baseJSON, 0, len(bases))
		for _, b := range bases {
			out = append(out, newBaseJSON(b))
		}
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tDISK\tMEMORY\tIMPORTED")
	for _, b := range bases {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", b.Name, b.ID.Short(), humanize.IBytes(uint64(b.Disk.Size)),
			humanize.IBytes(uint64(b.Memory.Size)), b.Imported.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

// baseJSON is a base as `base list --json` prints it: digests in hex.
type baseJSON struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	ChunkSize int       `json:"chunk_size"`
	Disk      fileJSON  `json:"disk"`
	Memory    fileJSON  `json:"memory"`
	State     fileJSON  `json:"state"`
	VMConfig  *fileJSON `json:"vm_config,omitempty"`
	Imported  time.Time `json:"imported"`
}

type fileJSON struct {
	Path    string `json:"path"`
	Size    int64  `json:"size"`
	ModTime int64  `json:"mtime_ns"`
	SHA     string `json:"sha256"`
}

func newBaseJSON(b *store.Base) baseJSON {
	file := func(f store.File) fileJSON {
		return fileJSON{Path: f.Path, Size: f.Size, ModTime: f.ModTime, SHA: f.SHA.String()}
	}
	out := baseJSON{ID: b.ID.String(), Name: b.Name, ChunkSize: b.ChunkSize,
		Disk: file(b.Disk), Memory: file(b.Memory), State: file(b.State), Imported: b.Imported}
	if b.VMConfig != nil {
		vc := file(*b.VMConfig)
		out.VMConfig = &vc
	}
	return out
}

// baseArg opens the store and finds the base the command's one argument
// names. Close the store when done.
func baseArg(c *cli.Context) (*store.Store, *store.Base, error) {
	if err := need(c, 1, "one base ID or NAME"); err != nil {
		return nil, nil, err
	}
	st, err := openStore(c)
	if err != nil {
		return nil, nil, err
	}
	b, err := st.Resolve(c.Args().First())
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return st, b, nil
}

func baseRm(c *cli.Context) error {
	st, b, err := baseArg(c)
	if err != nil {
		return err
	}
	defer st.Close()
	owned, err := st.OwnedDir(b)
	if err != nil {
		return err
	}
	if err := st.Remove(b); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "removed base %q (%s)\n", b.Name, b.ID)
	if owned != "" {
		fmt.Fprintf(c.App.Writer, "removed its files in %s\n", owned)
	}
	return nil
}

func baseVerify(c *cli.Context) error {
	st, b, err := baseArg(c)
	if err != nil {
		return err
	}
	defer st.Close()
	p := newProgress(c.App.ErrWriter)
	refreshed, err := st.VerifyContext(c.Context, b, func(n, total int64) { p.add("verifying", n, total) })
	p.done()
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "base %q is intact (%s)\n", b.Name, b.ID)
	if refreshed {
		fmt.Fprintln(c.App.Writer, "recorded the files' new sizes and modification times: the base can be used again")
	}
	return nil
}
