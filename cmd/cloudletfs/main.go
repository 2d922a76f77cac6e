// Command cloudletfs resumes custom VMs on a cloudlet from VM overlays, the
// small files that carry a custom VM as its difference from a base VM kept
// on the cloudlet, before the overlay has arrived. It builds, inspects,
// serves, mounts and launches overlays, and tunes their order from access
// traces. Run `cloudletfs --help` for the commands.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/cloudletfs/cloudletfs/store"
)

// version is set at link time by the Makefile.
var version = "dev"

func main() {
	// Signals are caught before anything is mounted or started: every
	// command sees them as the end of c.Context and cleans up after itself.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	// After the first signal the default action comes back, so a second
	// Ctrl-C ends a command that is slow to stop. Commands that handle a
	// second signal themselves (a mount that is held) have their own
	// channel.
	context.AfterFunc(ctx, stop)
	app := newApp(os.Stdout, os.Stderr)
	err := app.RunContext(ctx, interspersed(app, os.Args))
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		err = fmt.Errorf("stopped: %v", context.Cause(ctx))
	}
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloudletfs: %v\n", err)
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(1)
	}
}

// newApp builds the command tree. Output goes to stdout and stderr so tests
// can run commands in-process.
func newApp(stdout, stderr io.Writer) *cli.App {
	return checkUsage(&cli.App{
		Name:    "cloudletfs",
		Usage:   "resume custom VMs on a cloudlet from small VM overlays",
		Version: version,
		Description: `A cloudlet keeps base VMs (disk, memory, device state). A custom VM travels as a
VM overlay: only the chunks that differ from a base, deduplicated, compressed and
cut into verified segments in the order the VM is expected to touch them.

Typical use:
  cloudletfs base create --name debian --disk disk.img --memory-size 256MiB --ready 'login:'
  cloudletfs overlay capture --base debian --script install.sh --ready 'app-ready' -o app.overlay
  cloudletfs serve ./overlays                       # on the server side
  cloudletfs launch --probe 'curl -sf http://127.0.0.1:$CLOUDLETFS_PORT/' http://server:8080/app.overlay`,
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "state-dir", EnvVars: []string{"CLOUDLETFS_STATE_DIR"}, Value: store.DefaultDir(),
				Usage: "directory of the embedded store: base registry and chunk indexes"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		},
		Before: func(c *cli.Context) error {
			lvl, err := zerolog.ParseLevel(c.String("log-level"))
			if err != nil || lvl == zerolog.NoLevel {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
			}
			noColor := true
			if f, ok := stderr.(*os.File); ok {
				noColor = !term.IsTerminal(int(f.Fd()))
			}
			log := zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.TimeOnly, NoColor: noColor}).
				Level(lvl).With().Timestamp().Logger()
			c.App.Metadata = map[string]any{"log": log}
			return nil
		},
		Commands: append(append([]*cli.Command{baseCommand(), overlayCommand()}, runtimeCommands()...), append(append(append(vmCommands(), cloudletCommands()...), orderCommands()...), cacheCommand(), linkCommand())...),
	})
}

func logger(c *cli.Context) zerolog.Logger {
	if l, ok := c.App.Metadata["log"].(zerolog.Logger); ok {
		return l
	}
	return zerolog.Nop()
}

// openStore opens the state directory named by --state-dir.
func openStore(c *cli.Context) (*store.Store, error) {
	return store.Open(c.String("state-dir"), logger(c))
}

var jobsFlag = &cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Value: runtime.NumCPU(),
	Usage: "goroutines for hashing, compression and decoding; the default is the number of cores"}

// need reports a missing positional argument the way flags report theirs.
func need(c *cli.Context, n int, what string) error {
	if c.NArg() != n {
		return fmt.Errorf("%s: want %s (see --help)", c.Command.FullName(), what)
	}
	return nil
}
