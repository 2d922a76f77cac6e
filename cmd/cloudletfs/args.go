package main

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/urfave/cli/v2"
)

// interspersed moves the flags of the command being run in front of its
// positional arguments, so that `overlay extract FILE -o DIR` works as the
// usage lines show; urfave/cli stops reading flags at the first positional
// argument. Everything after "--" is left as it is, and for a command at
// the end of the path the "--" itself stays among the positional
// arguments, so that the command can tell extra arguments meant for QEMU
// from a positional argument too many.
func interspersed(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	cmds := app.Commands
	flags := app.Flags
	i := 1
	leaf := false
	var path []string
	// Walk down the command path, keeping global flags in place.
	for i < len(args) {
		a := args[i]
		if a == "--" {
			return args
		}
		if strings.HasPrefix(a, "-") {
			// A trailing flag that wants a value has none: urfave/cli
			// refuses it in one line.
			i = min(i+flagWidth(flags, a), len(args))
			continue
		}
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(a) {
				next = c
			}
		}
		if next == nil {
			break
		}
		i++
		path = append(path, next.Name)
		cmds, flags = next.Subcommands, next.Flags
		if len(cmds) == 0 {
			leaf = true
			break
		}
	}
	out := append([]string(nil), args[:i]...)
	var pos []string
	for i < len(args) {
		a := args[i]
		switch {
		case a == "--":
			pos = append(pos, args[i:]...)
			i = len(args)
		case strings.HasPrefix(a, "-") && a != "-":
			w := min(flagWidth(flags, a), len(args)-i)
			out = append(out, args[i:i+w]...)
			i += w
		default:
			pos = append(pos, a)
			i++
		}
	}
	if leaf && len(pos) > 0 {
		// The user's own "--" before the first positional argument says
		// what this one says, no more flags, unless the command takes
		// extra arguments after it.
		if pos[0] == "--" && !positional[strings.Join(path, " ")].extra {
			pos = pos[1:]
		}
		// Flag parsing takes this one, and stops here whatever follows.
		out = append(out, "--")
	}
	return append(out, pos...)
}

// extraArgs splits a command's positional arguments at the first "--":
// those before it, and the extra arguments after it.
func extraArgs(c *cli.Context) (pos, extra []string) {
	all := c.Args().Slice()
	if i := slices.Index(all, "--"); i >= 0 {
		return all[:i], all[i+1:]
	}
	return all, nil
}

// flagWidth is how many words flag word a takes: two for a flag that needs a
// value given as the next word, otherwise one.
func flagWidth(flags []cli.Flag, a string) int {
	name := strings.TrimLeft(a, "-")
	if strings.Contains(name, "=") {
		return 1
	}
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				if _, isBool := f.(*cli.BoolFlag); isBool {
					return 1
				}
				return 2
			}
		}
	}
	return 1
}

// positional says which positional arguments each command takes, by its
// path below the program's name: at least min, at most max (-1: no
// limit), and what they are. A command not listed takes none.
var positional = map[string]args{
	"base create":     {0, 0, "", true}, // extra QEMU arguments after --
	"base rm":         {1, 1, "one base ID or NAME", false},
	"base verify":     {1, 1, "one base ID or NAME", false},
	"overlay info":    {1, 1, "one overlay FILE", false},
	"overlay verify":  {1, 1, "one overlay FILE", false},
	"overlay extract": {1, 1, "one overlay FILE", false},
	"overlay reorder": {1, 1, "one overlay IN", false},
	"serve":           {1, 1, "one DIR to serve", false},
	"mount":           {2, 2, "OVERLAY and MOUNTPOINT", false},
	"umount":          {1, 1, "one MOUNTPOINT", false},
	"status":          {1, 1, "one MOUNTPOINT", false},
	"launch":          {1, 1, "an OVERLAY or DIR, then -- and extra QEMU arguments if any", true},
	"trace show":      {1, 1, "one TRACE", false},
	"trace merge":     {1, -1, "one TRACE or more", false},
	"cache verify":    {0, -1, "", false},
	"cache rm":        {1, 1, "one OVERLAY-ID (see cloudletfs cache ls)", false},
	"cloudlet-worker": {1, 1, "the VM's DIR", false},
	"synthesize":      {1, 1, "one OVERLAY-URL", false},
	"stop":            {1, -1, "one VM ID or more (see cloudletfs vms)", false},
	"handoff":         {1, 1, "one VM ID (see cloudletfs vms)", false},
	"link":            {1, 1, "one TARGET_HOST:PORT", false},
}

// args is what a command takes as positional arguments.
type args struct {
	min, max int
	what     string
	// extra: arguments after "--" are passed on (to QEMU), not counted.
	extra bool
}

// zeroDuration names the duration flags for which zero means something
// (no delay, not set); every other duration must be positive.
var zeroDuration = map[string]bool{"rtt": true, "startup": true, "ready-after": true}

// zeroInt names the whole-number flags for which zero means something; every
// other one counts something and must be positive.
var zeroInt = map[string]bool{"guest-port": true, "max-vms": true}

// wasRequired remembers the flags checkUsage took the Required mark off,
// since the flag values are shared by every app built in one process.
var wasRequired sync.Map // cli.Flag -> true

// checkUsage makes app refuse bad usage in one line, as other tools do:
// a flag that does not parse, a missing required flag, a value out of
// range, a positional argument too many or too few, and an unknown command
// each give one line that ends in where to read more, never the whole
// help. `cloudletfs help [COMMAND...]` prints the help and exits 0.
func checkUsage(app *cli.App) *cli.App {
	app.OnUsageError = usageError
	app.Action = groupAction()
	var walk func(path string, cmds []*cli.Command)
	walk = func(path string, cmds []*cli.Command) {
		for _, cmd := range cmds {
			full := strings.TrimSpace(path + " " + cmd.Name)
			cmd.OnUsageError = usageError
			if len(cmd.Subcommands) > 0 {
				cmd.Action = groupAction(strings.Fields(full)...)
				walk(full, cmd.Subcommands)
				continue
			}
			cmd.Action = checked(app.Name+" "+full, positional[full], cmd.Flags, cmd.Action)
		}
	}
	walk("", app.Commands)
	return app
}

// usageError turns a flag that did not parse into one line.
func usageError(c *cli.Context, err error, _ bool) error {
	msg := err.Error()
	if m := badValue.FindStringSubmatch(msg); m != nil {
		flag := dashes(m[2])
		msg = fmt.Sprintf("%s %q: %s", flag, m[1], m[3])
		for _, f := range c.Command.Flags {
			if slices.Contains(f.Names(), m[2]) {
				switch f.(type) {
				case *cli.DurationFlag:
					msg = fmt.Sprintf("%s %q: want a duration such as 20ms or 1m30s", flag, m[1])
				case *cli.IntFlag:
					msg = fmt.Sprintf("%s %q: want a whole number", flag, m[1])
				}
			}
		}
	} else if m := unknownFlag.FindStringSubmatch(msg); m != nil {
		msg = "unknown flag " + dashes(m[1])
	} else if m := noValue.FindStringSubmatch(msg); m != nil {
		msg = dashes(m[1]) + " needs a value"
	}
	name := c.Command.HelpName
	if name == c.App.Name {
		return fmt.Errorf("%s (see %s --help)", msg, name)
	}
	return fmt.Errorf("%s: %s (see %s --help)", strings.TrimPrefix(name, c.App.Name+" "), msg, name)
}

// dashes spells a flag name as it is typed: -j, --jobs.
func dashes(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// The messages of package flag, which urfave/cli passes on.
var (
	badValue    = regexp.MustCompile(`^invalid value "(.*)" for flag -+([^:]+): (.*)$`)
	unknownFlag = regexp.MustCompile(`^flag provided but not defined: -+(.*)$`)
	noValue     = regexp.MustCompile(`^flag needs an argument: -+(.*)$`)
)

// groupAction runs for a command that only holds others (and for the
// program itself), group being its path below the program's name: without
// arguments, or with "help", it prints the help; anything else is an
// unknown command.
func groupAction(group ...string) cli.ActionFunc {
	return func(c *cli.Context) error {
		if c.NArg() == 0 {
			return cli.ShowSubcommandHelp(c)
		}
		words := c.Args().Slice()
		if words[0] == "help" {
			if len(words) == 1 {
				return cli.ShowSubcommandHelp(c)
			}
			if cmd := c.Command.Command(words[1]); cmd != nil {
				// The command's own --help, wherever it sits in the tree:
				// only the words that name commands are passed on, so
				// that what follows is never run.
				path := append(append([]string{c.App.Name}, group...), words[1])
				for _, w := range words[2:] {
					if cmd = cmd.Command(w); cmd == nil {
						break
					}
					path = append(path, w)
				}
				return c.App.RunContext(c.Context, append(path, "--help"))
			}
			words = words[1:]
		}
		here := strings.Join(append([]string{c.App.Name}, group...), " ")
		return fmt.Errorf("unknown command %q; see %s --help", strings.Join(append(append([]string(nil), group...), words[0]), " "), here)
	}
}

// checked wraps a command's action so that it first refuses bad usage:
// positional arguments too many or too few, a required flag not given, or
// a flag value out of range.
func checked(name string, pos args, flags []cli.Flag, action cli.ActionFunc) cli.ActionFunc {
	var required []string
	for _, f := range flags {
		if unrequire(f) {
			required = append(required, f.Names()[0])
		}
	}
	return func(c *cli.Context) error {
		fail := func(format string, a ...any) error {
			return fmt.Errorf("%s: %s (see %s --help)", strings.TrimPrefix(name, c.App.Name+" "), fmt.Sprintf(format, a...), name)
		}
		given := c.Args().Slice()
		if pos.extra {
			given, _ = extraArgs(c)
		}
		switch n := len(given); {
		case n > pos.max && pos.max >= 0:
			takes := "no arguments"
			if pos.what != "" {
				takes = pos.what
			}
			if pos.extra {
				return fail("unexpected argument %q; extra QEMU arguments go after --", given[pos.max])
			}
			return fail("unexpected argument %q; it takes %s", given[pos.max], takes)
		case n < pos.min:
			return fail("want %s", pos.what)
		}
		for _, f := range flags {
			if err := checkValue(c, f); err != nil {
				return fail("%v", err)
			}
		}
		for _, r := range required {
			if !c.IsSet(r) {
				return fail("--%s is required", r)
			}
		}
		err := action(c)
		var fv *flagValueError
		if errors.As(err, &fv) {
			return fail("%v", fv)
		}
		return err
	}
}

// flagValueError is a flag value a command refused once it parsed it: the
// command's wrapper gives it the one-line form usage errors have.
type flagValueError struct{ msg string }

func (e *flagValueError) Error() string { return e.msg }

// badFlag reports a flag value that a command refuses.
func badFlag(format string, a ...any) error {
	return &flagValueError{fmt.Sprintf(format, a...)}
}

// unrequire takes the Required mark off a flag, so that urfave/cli does
// not answer its absence with the whole help, and reports whether the flag
// is required.
func unrequire(f cli.Flag) bool {
	if _, ok := wasRequired.Load(f); ok {
		return true
	}
	var req *bool
	switch f := f.(type) {
	case *cli.StringFlag:
		req = &f.Required
	case *cli.PathFlag:
		req = &f.Required
	case *cli.StringSliceFlag:
		req = &f.Required
	case *cli.IntFlag:
		req = &f.Required
	case *cli.DurationFlag:
		req = &f.Required
	default:
		return false
	}
	if !*req {
		return false
	}
	wasRequired.Store(f, true)
	*req = false
	return true
}

// checkValue refuses a value no command could mean: a negative duration,
// a zero one where zero means nothing, a count of zero or less, a chunk size
// that is not a power of two.
func checkValue(c *cli.Context, f cli.Flag) error {
	name := f.Names()[0]
	switch f.(type) {
	case *cli.DurationFlag:
		d := c.Duration(name)
		switch {
		case d < 0:
			return fmt.Errorf("--%s %s: want a duration of zero or more, such as 20ms", name, d)
		case d == 0 && !zeroDuration[name]:
			return fmt.Errorf("--%s %s: want a duration above zero, such as 500ms", name, d)
		}
	case *cli.IntFlag:
		n := c.Int(name)
		switch {
		case name == "guest-port" && (n < 0 || n > 65535):
			return fmt.Errorf("--%s %d: want a TCP port from 1 to 65535, or 0 for none", name, n)
		case n < 0 && zeroInt[name]:
			return fmt.Errorf("--%s %d: want 0 or a whole number above it", name, n)
		case n < 0 || n == 0 && !zeroInt[name]:
			return fmt.Errorf("--%s %d: want a whole number above zero", name, n)
		case name == "chunk-size" && n&(n-1) != 0:
			return fmt.Errorf("--%s %d: want a power of two, such as 4096", name, n)
		}
	}
	return nil
}
