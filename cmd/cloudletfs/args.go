package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// interspersed moves the flags of the command being run in front of its
// positional arguments, so that `overlay extract FILE -o DIR` works as the
// usage lines show; urfave/cli stops reading flags at the first positional
// argument. Everything after "--" is left as it is.
func interspersed(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	cmds := app.Commands
	flags := app.Flags
	i := 1
	// Walk down the command path, keeping global flags in place.
	for i < len(args) {
		a := args[i]
		if a == "--" {
			return args
		}
		if strings.HasPrefix(a, "-") {
			i += flagWidth(flags, a)
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
		cmds, flags = next.Subcommands, next.Flags
		if len(cmds) == 0 {
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
	return append(out, pos...)
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
